"""multijepa.finetune: an encoder and a linear head trained on labels, on probe's split, for any modality."""

import hashlib
import json

import numpy as np
import pytest
import torch

from conftest import IMAGE_RECIPE, ROOT, TINY, TINY_AUDIO, TINY_IMAGE, TINY_TS, write_ts
from multijepa import evaluate
from multijepa.embed import Embedder, load
from multijepa.errors import MultijepaError, TrainingError
from multijepa.evaluate import stratified_split
from multijepa.finetune import finetune, finetune_model, split_labelled
from multijepa.recipe import load_recipe
from multijepa.train import pretrain

FAST = dict(device="cpu", precision="fp32", num_workers=0)
KEYS = {"accuracy", "train_accuracy", "n_train", "n_test", "epochs", "seconds", "precision"}


@pytest.fixture(scope="module")
def image_ckpt(tmp_path_factory, shapes):
    """A tiny image model pretrained three steps on the shapes set: its last.pt."""
    run = tmp_path_factory.mktemp("finetune") / "image"
    pretrain(load_recipe(IMAGE_RECIPE, TINY_IMAGE + [f"data.path={shapes}", f"run.dir={run}", "train.steps=3"]))
    return str(run / "last.pt")


def order_task(path, n: int, seed: int):
    """Series of 32 samples with a +1 and a -1 bump at random places; the class is which comes first.

    Every series of either class holds the same patches, only in another order: a linear head on
    frozen mean-pooled features of a (nearly) untrained encoder stays near chance."""
    rng = np.random.default_rng(seed)
    series, labels = [], []
    for i in range(n):
        x = rng.normal(0, 0.1, 32)
        a, b = sorted(rng.choice(np.arange(2, 30, 4), 2, replace=False))
        up_first = i % 2
        x[a:a + 2] += 1.0 if up_first else -1.0
        x[b:b + 2] -= 1.0 if up_first else -1.0
        series.append(x[None])
        labels.append("up_down" if up_first else "down_up")
    return write_ts(path, series, labels)


@pytest.fixture(scope="module")
def order(tmp_path_factory):
    """(train.ts, test.ts, last.pt): the order task, 48 series each, and a tiny model pretrained on it two steps."""
    root = tmp_path_factory.mktemp("order")
    train, test = order_task(root / "train.ts", 48, 0), order_task(root / "test.ts", 48, 1)
    pretrain(load_recipe(ROOT / "recipes/timeseries.yaml", TINY_TS + [f"data.path={train}", f"run.dir={root / 'run'}",
                                                                      "train.steps=2"]))
    return str(train), str(test), str(root / "run/last.pt")


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_finetune__tiny_image_model_gives_a_sensible_result(image_ckpt, shapes, capsys):
    before = digest(image_ckpt)
    result = finetune(str(shapes), image_ckpt, epochs=2, progress=True, **FAST)
    assert set(result) == KEYS
    assert (result["n_train"], result["n_test"], result["epochs"], result["precision"]) == (24, 8, 2, "fp32")
    assert 0 <= result["accuracy"] <= 1 and 0 <= result["train_accuracy"] <= 1 and result["seconds"] > 0
    assert "finetune" in capsys.readouterr().err  # the progress bar
    # bf16 autocast as pretrain uses it (emulated where the CPU has no bf16 units: slower, still correct)
    baseline = finetune(str(shapes), image_ckpt, epochs=1, random_init=True, device="cpu", precision="bf16",
                        num_workers=0)
    assert (baseline["n_train"], baseline["n_test"], baseline["precision"]) == (24, 8, "bf16")
    assert digest(image_ckpt) == before  # read, never written


def test_split_labelled__is_probes_split_for_the_same_seed(image_ckpt, shapes, order, monkeypatch):
    seen = []  # what probe splits: its label array and its given test set, caught before it fits anything
    monkeypatch.setattr(evaluate, "probe_features", lambda features, labels, **kw: seen.append((labels, kw)) or
                        {"linear": 0.0, "knn": 0.0, "n_train": 0, "n_test": 0})
    recipe = load(image_ckpt, "cpu").recipe
    for seed in (0, 3):
        evaluate.probe(str(shapes), image_ckpt, seed=seed, device="cpu", precision="fp32", num_workers=0)
        labels, kw = seen.pop()
        split = split_labelled(recipe, str(shapes), None, 0.2, seed)
        assert kw["seed"] == seed and kw["test_fraction"] == 0.2 and kw["test_index"] is None
        train, test = stratified_split(labels, 0.2, seed)  # probe_features' split of those labels
        assert np.array_equal(split.labels, labels) and (len(split.train), len(split.test)) == (24, 8)
        assert np.array_equal(split.train, train) and np.array_equal(split.test, test)
    assert split_labelled(recipe, str(shapes), seed=0).test.tolist() != split.test.tolist()  # seeds differ
    train_ts, test_ts, ckpt = order
    evaluate.probe(train_ts, ckpt, test_data=test_ts, device="cpu", precision="fp32", num_workers=0)
    labels, kw = seen.pop()
    split = split_labelled(load(ckpt, "cpu").recipe, train_ts, test_ts)
    assert np.array_equal(split.labels, labels) and np.array_equal(split.test, kw["test_index"])
    assert split.train.tolist() == list(range(48)) and split.test.tolist() == list(range(48, 96))
    assert split.classes == ["down_up", "up_down"] and split.labels[:4].tolist() == [0, 1, 0, 1]


def test_finetune_model__frozen_encoder_unchanged_trained_one_changed_loaded_one_untouched(image_ckpt, shapes):
    model = load(image_ckpt, "cpu", "fp32")
    loaded = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    _, frozen = finetune_model(model, str(shapes), epochs=2, encoder_lr_scale=0, num_workers=0)
    assert all(torch.equal(v, loaded[k]) for k, v in frozen.encoder.state_dict().items())
    _, tuned = finetune_model(model, str(shapes), epochs=2, encoder_lr_scale=0.1, num_workers=0)
    changed = [k for k, v in tuned.encoder.state_dict().items() if not torch.equal(v, loaded[k])]
    assert any(k.startswith("tokenizers.image") for k in changed) and any(k.startswith("encoder.") for k in changed)
    assert tuned.encoder is not model.encoder
    assert all(torch.equal(v, loaded[k]) for k, v in model.encoder.state_dict().items())  # the copy was trained


def test_finetune__ts_file_with_test_set_beats_chance_where_frozen_features_do_not(order):
    train, test, ckpt = order
    options = dict(test_data=test, epochs=40, lr=3e-3, batch_size=8, **FAST)
    frozen = finetune(train, ckpt, encoder_lr_scale=0, **options)
    tuned = finetune(train, ckpt, encoder_lr_scale=1.0, **options)
    assert (tuned["n_train"], tuned["n_test"]) == (48, 48)
    # Over seeds 0-5 of this set-up: frozen test accuracy 0.46-0.56; fine-tuned 0.83-0.94, train 1.0.
    assert frozen["accuracy"] <= 0.65 and tuned["accuracy"] >= 0.75 and tuned["train_accuracy"] >= 0.95


def test_finetune_model__same_seed_same_weights_for_any_worker_count(image_ckpt, shapes):
    model = load(image_ckpt, "cpu", "fp32")
    first, a = finetune_model(model, str(shapes), seed=1, epochs=2, batch_size=8, num_workers=0)
    again, b = finetune_model(model, str(shapes), seed=1, epochs=2, batch_size=8, num_workers=1)
    assert {k: v for k, v in first.items() if k != "seconds"} == {k: v for k, v in again.items() if k != "seconds"}
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    _, c = finetune_model(model, str(shapes), seed=2, epochs=2, batch_size=8, num_workers=0)
    assert not torch.equal(a.head[1].weight, c.head[1].weight)


def labelled_clouds(root):
    """Spheres and cubes, 6 each, 150 points, as .npy arrays in class folders."""
    rng = np.random.default_rng(0)
    for kind in ("sphere", "cube"):
        (root / kind).mkdir(parents=True)
        for i in range(6):
            x = rng.normal(size=(150, 3))
            x = x / np.linalg.norm(x, axis=1, keepdims=True) if kind == "sphere" else x / np.abs(x).max(1, keepdims=True)
            np.save(root / kind / f"{i}.npy", x.astype(np.float32))
    return root


@pytest.mark.parametrize("modality", ["audio", "video", "pointcloud"])
def test_finetune_model__audio_video_and_points_train_and_score(modality, tmp_path):
    """The other modalities through the same path: training clips / crops / sampled points from the
    modality's loader (short audio NaN-padded), several views per sample at scoring (windows, clips)."""
    if modality == "audio":
        pytest.importorskip("torchaudio")
        from audio_files import make_audio_folder

        data, overrides, n = make_audio_folder(tmp_path / "audio"), TINY_AUDIO, 12
    elif modality == "video":
        pytest.importorskip("av")
        from video_files import make_video_folder

        data, n = make_video_folder(tmp_path / "video"), 8
        overrides = TINY + ["video.frames=4", "video.frame_stride=2", "video.size=32", "video.patch_size=8",
                            "video.embed_clips=3", "mask.min_context=2"]
    else:
        pytest.importorskip("open3d")
        data, n = labelled_clouds(tmp_path / "clouds"), 12
        overrides = TINY + ["pointcloud.num_points=128", "pointcloud.num_groups=16", "pointcloud.group_size=8",
                            "pointcloud.pointnet_width=16", "mask.min_context=2"]
    model = Embedder.random_init(load_recipe(ROOT / f"recipes/{modality}.yaml", overrides), device="cpu",
                                 precision="fp32")
    result, classifier = finetune_model(model, str(data), epochs=2, batch_size=4, num_workers=0)
    assert (result["n_train"], result["n_test"]) == (n - 2, 2) and 0 <= result["accuracy"] <= 1
    assert classifier.classes == sorted(p.name for p in data.iterdir())


@pytest.mark.parametrize("option, match", [
    (dict(epochs=0), "--epochs"), (dict(lr=0.0), "--lr"), (dict(lr=float("nan")), "--lr"),
    (dict(encoder_lr_scale=-0.1), "--encoder-lr-scale"), (dict(weight_decay=-1.0), "--weight-decay"),
    (dict(batch_size=0), "--batch-size"), (dict(test_fraction=1.0), "--test-fraction"),
])
def test_finetune__bad_option_values_name_the_option(option, match):
    with pytest.raises(MultijepaError, match=match):
        finetune("anything/", "no-such.pt", **option)


def test_finetune__without_checkpoint_says_so():
    with pytest.raises(MultijepaError, match="--checkpoint"):
        finetune("anything/", None)


def test_finetune__missing_unlabelled_or_one_class_data_is_refused(image_ckpt, shapes, tmp_path):
    with pytest.raises(MultijepaError, match="nowhere: no such folder or file"):
        finetune(str(tmp_path / "nowhere"), image_ckpt, **FAST)
    for name, folder in (("flat", tmp_path / "flat"), ("one", tmp_path / "one" / "circle")):
        folder.mkdir(parents=True)
        for png in sorted((shapes / "circle").iterdir())[:4]:
            (folder / png.name).write_bytes(png.read_bytes())
        with pytest.raises(MultijepaError, match=f"{tmp_path / name}: finetuning needs labels.*two classes"):
            finetune(str(tmp_path / name), image_ckpt, **FAST)


def test_finetune__a_split_without_test_samples_is_refused(image_ckpt, shapes, tmp_path):
    for kind in ("circle", "square"):  # one image per class: a stratified split tests none
        (tmp_path / "tiny" / kind).mkdir(parents=True)
        png = sorted((shapes / kind).iterdir())[0]
        (tmp_path / "tiny" / kind / png.name).write_bytes(png.read_bytes())
    with pytest.raises(MultijepaError, match="tiny: the split leaves no test samples.*--test"):
        finetune(str(tmp_path / "tiny"), image_ckpt, **FAST)


def test_finetune__nan_loss_stops_with_advice_to_lower_lr(image_ckpt, shapes):
    with pytest.raises(TrainingError, match=r"loss became (nan|inf) in epoch 2: lower --lr \(now 1e\+38\)"):
        finetune(str(shapes), image_ckpt, epochs=3, lr=1e38, **FAST)


def test_finetune__the_cli_prints_the_result_and_its_json(image_ckpt, shapes, capsys):
    from multijepa.cli import main

    assert main(["finetune", str(shapes), "--checkpoint", image_ckpt, "--epochs", "1", "--workers", "0",
                 "--device", "cpu", "--precision", "fp32", "--json"]) == 0
    line, payload = capsys.readouterr().out.splitlines()[-2:]
    assert line.startswith("JEPA encoder fine-tuned (24 train / 8 test, 1 epochs, fp32): accuracy ")
    assert set(json.loads(payload)) == KEYS
    assert main(["finetune", str(shapes), "--checkpoint", image_ckpt, "--encoder-lr-scale", "-1"]) == 2
    assert "--encoder-lr-scale" in capsys.readouterr().err
