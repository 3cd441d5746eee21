"""Mixed modalities: the recipe's sources, the Mixed API and its sampling, one model over several
modalities, and a tiny three-modality run through the CLI."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import multijepa as mj
from audio_files import make_audio_folder
from conftest import ROOT, TINY, check_killed_run_resumes_on_the_same_curve, run_cli, write_ts
from multijepa.datasets.files import resolve_recipe
from multijepa.datasets.mixed import Batches, MixPlan, build_train_loader, step_keys
from multijepa.errors import DataError, RecipeError
from multijepa.recipe import load_recipe
from multijepa.train import build_model

MIXED_RECIPE = ROOT / "recipes/multimodal.yaml"
# Tiny settings for every modality of recipes/multimodal.yaml: 16 px images, 0.5 s clips at 8 kHz
# with 16 mel bins, series patches of 4 through one narrow convolution.
TINY_MIXED = TINY + ["image.size=16", "audio.sample_rate=8000", "audio.clip_seconds=0.5", "audio.n_mels=16",
                     "audio.patch_size=[4,4]", "timeseries.conv_widths=[8]", "mask.min_context=2",
                     "sources.audio.mask.min_context=2", "sources.timeseries.mask.min_context=2",
                     "data.batch_size=12"]


@pytest.fixture(scope="module")
def three(tmp_path_factory, shapes) -> dict[str, Path]:
    """Labelled data of three modalities: shapes (images), chirps (audio), two classes of series."""
    root = tmp_path_factory.mktemp("three")
    rng = np.random.default_rng(0)
    labels = [i % 2 for i in range(24)]
    series = [np.sin(np.linspace(0, (3 + 5 * y) * np.pi, int(n)))[None] + 0.1 * rng.standard_normal((1, int(n)))
              for y, n in zip(labels, rng.integers(16, 40, 24))]
    return {"image": shapes, "audio": make_audio_folder(root / "audio"),
            "timeseries": write_ts(root / "series.ts", series, labels)}


def mixed(three: dict[str, Path], *extra: str) -> mj.Recipe:
    paths = [f"sources.{m}.path={p}" for m, p in three.items()]
    return resolve_recipe(load_recipe(MIXED_RECIPE, TINY_MIXED + paths + list(extra)))


def tensor_recipe(*extra: str, weights: dict | None = None, mix: str = "proportion") -> mj.Recipe:
    """A mixed recipe of images and series fed from tensors (``Mixed`` sets data.mix and the weights)."""
    data = mj.datasets.Mixed({"image": mj.datasets.Tensors("image", [torch.zeros(3, 16, 16)]),
                              "timeseries": mj.datasets.Tensors("timeseries", [torch.zeros(1, 16)])},
                             weights=weights, mix=mix)
    return data.apply_to(load_recipe(MIXED_RECIPE, TINY_MIXED + ["timeseries.length=16", "timeseries.channels=1",
                                                                 *extra]))


# --------------------------------------------------------------------------- recipe


def test_recipe__sources_by_index_or_modality_and_errors_name_the_source(tmp_path):
    r = load_recipe(MIXED_RECIPE, ["sources.audio.path=a/", "sources.1.path=b/"])
    assert r.modalities == ("audio", "image", "timeseries")
    assert r.source("audio").data.path == "a/" and r.source("image").data.path == "b/"
    assert r.source("audio").mask.full_span_axes == (0,) and r.source("image").mask == r.mask
    with pytest.raises(RecipeError, match="no entry 'video'.*audio, image, timeseries"):
        load_recipe(MIXED_RECIPE, ["sources.video.path=x"])
    with pytest.raises(RecipeError, match=r"sources\[1\].*image"):
        load_recipe(MIXED_RECIPE, ["sources.image.mask.num_targets=0"])
    with pytest.raises(RecipeError, match="lists audio twice"):
        load_recipe(MIXED_RECIPE, ["sources.image.modality=audio"])
    with pytest.raises(RecipeError, match="data.path"):
        load_recipe(MIXED_RECIPE, ["data.path=x"])
    with pytest.raises(RecipeError, match="gives source timeseries no sample per batch"):
        load_recipe(MIXED_RECIPE, ["data.batch_size=2"])


# --------------------------------------------------------------------------- sampling


def test_mix_plan__proportion_splits_every_batch_by_weight():
    r = tensor_recipe("data.batch_size=12", weights={"image": 2, "timeseries": 1})
    assert r.data.mix == "proportion"
    plan = MixPlan(r)
    assert all(plan.counts(s) == [8, 4] for s in range(5)) and plan.starts(3) == [24, 12]


def test_mix_plan__weights_draw_each_sample_by_weight_deterministically():
    r = tensor_recipe(weights={"image": 3, "timeseries": 1}, mix="weights")
    plan = MixPlan(r)
    counts = np.array([plan.counts(s) for s in range(500)])
    assert (counts.sum(1) == 12).all() and len({tuple(c) for c in counts}) > 3  # the split varies by step
    share = counts.sum(0) / counts.sum()
    assert share[0] == pytest.approx(0.75, abs=0.02)  # 6,000 draws: 3 sigma is about 0.017
    assert np.array_equal(counts, [MixPlan(r).counts(s) for s in range(500)])  # same seed, same draws
    # Starts are the running sums, whichever step is asked first (a resumed run asks a late one).
    assert MixPlan(r).starts(400) == counts[:400].sum(0).tolist() == plan.starts(400)
    other = MixPlan(tensor_recipe("train.seed=1", weights={"image": 3, "timeseries": 1}, mix="weights"))
    assert not np.array_equal(counts, [other.counts(s) for s in range(500)])


@pytest.mark.parametrize("mix", ["proportion", "weights"])
def test_step_keys__ranks_take_disjoint_shares_covering_every_sample(mix):
    r = tensor_recipe("data.batch_size=6", mix=mix)
    assert r.data.mix == mix  # Mixed sets it: an override of data.mix alone would be replaced
    plan, sizes = MixPlan(r), [30, 18]
    taken = {0: [], 1: []}
    steps = 10
    for step in range(steps):
        for rank in (0, 1):
            keys = step_keys(plan, sizes, step, rank, world=2)
            assert len(keys) == 6
            for k, i in keys:
                taken[k].append(i)
    # Every source walks whole permutations: over full epochs each sample comes up equally often.
    for k, n in enumerate(sizes):
        counts = np.bincount(taken[k], minlength=n)
        assert counts.max() - counts.min() <= 1, (k, counts)
    # Within one step the two ranks take disjoint runs of each source's positions (identity chains
    # show positions; a step that straddles an epoch end may still meet a sample twice, as in
    # single-modality training when the data set is not a multiple of the global batch).
    positions = [range(10**9)] * 2
    for step in range(steps):
        a, b = (set(step_keys(plan, sizes, step, rank, 2, positions)) for rank in (0, 1))
        assert not a & b and len(a) == len(b) == 6


def test_batches__resume_mid_epoch_and_worker_count_give_the_same_batches(three):
    r = mixed(three, "data.num_workers=0")
    straight = [b for _, b in zip(range(6), Batches(r))]
    resumed = [b for _, b in zip(range(3), Batches(r, start_step=3))]
    workers = [b for _, b in zip(range(6), build_train_loader(mixed(three, "data.num_workers=2")))]
    for a, b in zip(straight[3:] + straight, resumed + workers):
        assert a["step"] == b["step"] and a["parts"].keys() == b["parts"].keys() == {"audio", "image", "timeseries"}
        for m in a["parts"]:
            for key in ("input", "context_idx", "target_idx"):
                assert torch.equal(torch.nan_to_num(a["parts"][m][key]), torch.nan_to_num(b["parts"][m][key])), (m, key)
    assert [len(b["parts"]["image"]["input"]) for b in straight] == [4] * 6


def test_mixed__tensors_train_and_a_bad_tensor_names_itself(tmp_path):
    images = [torch.randint(0, 255, (3, 20, 20), dtype=torch.uint8) for _ in range(10)]
    series = [torch.randn(1, int(n)) for n in range(10, 30, 2)]
    data = mj.datasets.Mixed({"image": mj.datasets.Tensors("image", images),
                              "timeseries": mj.datasets.Tensors("timeseries", series)}, weights={"image": 1})
    r = load_recipe(MIXED_RECIPE, TINY_MIXED + ["timeseries.length=16", "timeseries.channels=1", "train.steps=3",
                                                f"run.dir={tmp_path / 'run'}"])
    run = mj.pretrain(r, data=data)
    saved = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(saved) == 3 and {"loss_prediction_image", "loss_prediction_timeseries"} <= saved[-1].keys()
    model = mj.load(run / "last.pt")
    assert model.modalities == ("image", "timeseries")
    assert model.for_modality("timeseries").embed([torch.randn(40)]).shape == (1, 32)
    with pytest.raises(mj.MultijepaError, match="say which modality"):
        model.embed([torch.randn(40)])
    unsized = load_recipe(MIXED_RECIPE, TINY_MIXED + [f"run.dir={tmp_path / 'unsized'}"])  # timeseries.length: 0
    with pytest.raises(DataError, match=r"in-memory timeseries samples: set timeseries.length and "
                                        r"timeseries.channels in the recipe"):
        mj.pretrain(unsized, data=data)
    bad = mj.datasets.Mixed({"image": mj.datasets.Tensors("image", [torch.zeros(7)]),
                             "timeseries": mj.datasets.Tensors("timeseries", series)})
    with pytest.raises(DataError, match="image tensor 0"):
        mj.pretrain(dataclasses.replace(r, run=dataclasses.replace(r.run, dir=str(tmp_path / "bad"))), data=bad)


def test_mixed__api_errors_say_what_to_do():
    with pytest.raises(DataError, match="key each source by its modality"):
        mj.datasets.Mixed({"audio": mj.datasets.ImageFolder("x")})
    with pytest.raises(DataError, match="no source"):
        mj.datasets.Mixed({"image": mj.datasets.ImageFolder("x")}, weights={"audio": 1})
    with pytest.raises(DataError, match="path or tensors"):
        mj.datasets.Source("image")
    with pytest.raises(RecipeError, match="use a mixed recipe"):
        mj.datasets.Mixed({"audio": mj.datasets.AudioFolder("x")}).apply_to(load_recipe(ROOT / "recipes/image.yaml"))


# --------------------------------------------------------------------------- one model


def test_backbone__encoding_modalities_together_equals_encoding_each_alone(three):
    r = mixed(three)
    model = build_model(r).eval()
    batch = next(iter(Batches(r)))["parts"]
    together, segments = model.context.encode({m: (p["input"], None, p["valid"]) for m, p in batch.items()})
    assert segments is not None  # three lengths: packed
    for m, p in batch.items():
        alone, _ = model.context(p["input"], m, real=p["valid"])
        real = p["valid"] if p["valid"] is not None else torch.ones(alone.shape[:2], dtype=torch.bool)
        assert torch.allclose(together[m][0][real], alone[real], atol=1e-5), m


def test_jepa__under_ddp_a_batch_without_a_modality_still_meets_the_other_ranks_sigreg(three, monkeypatch):
    """SIGReg all-reduces per modality, so every rank calls it for every modality in the model's order:
    one whose batch lacks a source calls it with no samples (faked two-rank world, calls recorded)."""
    from multijepa.core import jepa

    calls = []
    monkeypatch.setattr(jepa, "world_size", lambda: 2)
    monkeypatch.setattr(jepa, "sigreg", lambda z, *a, **k: (calls.append(len(z)), z.sum() * 0)[1])
    model = build_model(mixed(three, "loss.regularizer=sigreg", "loss.regularizer_on=samples"))
    batch = next(iter(Batches(mixed(three))))["parts"]
    model({m: p for m, p in reversed(batch.items()) if m != "image"})
    assert list(model.context.tokenizers) == ["audio", "image", "timeseries"]
    assert calls == [len(batch["audio"]["input"]), 0, len(batch["timeseries"]["input"])]
    assert model.sigreg_draws == 3


def test_jepa__mixed_loss_is_the_weighted_sum_and_every_tokenizer_learns(three):
    r = mixed(three, "sources.audio.loss_weight=0.5", "sources.image.loss_weight=2")
    model = build_model(r)
    batch = next(iter(Batches(r)))["parts"]
    out = model(batch)
    expect = sum(w * out[f"prediction/{m}"] for m, w in (("audio", 0.5), ("image", 2.0), ("timeseries", 1.0)))
    assert out["prediction"] == pytest.approx(float(expect), rel=1e-5)
    assert 0 < float(out["padding_waste"]) < 1
    out["loss"].backward()
    for m in ("audio", "image", "timeseries"):
        grads = [p.grad for p in model.context.tokenizers[m].parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
        assert model.context.modality_embed[m].grad is not None


def test_build_model__each_source_normalises_its_targets_as_it_says():
    r = load_recipe(MIXED_RECIPE, TINY_MIXED)
    assert build_model(r).target_norms == {"audio": "instance", "image": "layer", "timeseries": "layer"}
    r = load_recipe(MIXED_RECIPE, TINY_MIXED + ["sources.audio.target_norm=none", "loss.target_norm=instance"])
    assert build_model(r).target_norms == {"audio": "none", "image": "instance", "timeseries": "instance"}


# --------------------------------------------------------------------------- CLI


def test_cli__three_modalities_pretrain_resume_embed_probe(three, tmp_path):
    args = [str(MIXED_RECIPE), *TINY_MIXED, *[f"sources.{m}.path={p}" for m, p in three.items()],
            "train.checkpoint_every=3", "train.steps=12"]
    check_killed_run_resumes_on_the_same_curve(args, steps=12, cwd=tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "straight/metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["padding_waste"] < 1 and "loss_prediction_audio" in r for r in rows)

    # embed: any file type the checkpoint was trained on, found without --checkpoint under runs/
    (tmp_path / "runs").mkdir()
    (tmp_path / "straight").rename(tmp_path / "runs/multimodal")
    image = sorted((three["image"] / "circle").glob("*.png"))[0]
    audio = sorted((three["audio"] / "low").glob("*.wav"))[0]
    proc = run_cli("embed", str(audio), str(image), str(three["timeseries"]), cwd=tmp_path)
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [Path(x["file"]).suffix for x in lines] == [".wav", ".png"] + [".ts"] * 24
    assert {len(x["embedding"]) for x in lines} == {32} and "runs/multimodal/last.pt" in proc.stderr
    proc = run_cli("embed", str(tmp_path / "nothing.mp4"), str(image), cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "video" in proc.stderr

    # probe: per modality from the same checkpoint, chosen by the files the data holds
    ckpt = str(tmp_path / "runs/multimodal/last.pt")
    for data in (three["image"], three["timeseries"], three["audio"]):
        proc = run_cli("probe", str(data), "--checkpoint", ckpt, "--folds", "2", "--json", cwd=tmp_path)
        assert 0 <= json.loads(proc.stdout.splitlines()[-1])["linear"] <= 1


def test_torchrun__mixed_run_with_random_splits_trains_on_two_processes(three, tmp_path):
    """data.mix: weights may leave a modality out of a step: its parameters get no gradient there,
    which DDP must accept; both ranks draw the same split, each its own samples."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "multijepa",
           "pretrain", str(MIXED_RECIPE), *TINY_MIXED, *[f"sources.{m}.path={p}" for m, p in three.items()],
           "data.mix=weights", "sources.timeseries.weight=0.05", "data.batch_size=6", "run.dir=run",
           "train.steps=6", "train.checkpoint_every=3"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert any("loss_prediction_timeseries" not in r for r in rows)  # a step without series
    assert torch.load(tmp_path / "run/last.pt", weights_only=True)["step"] == 6


def test_mixed__shards_and_a_file_list_as_sources(shapes, three, tmp_path):
    from multijepa.datasets.shards import write_shards

    write_shards(shapes, tmp_path / "shards", per_shard=10)
    listed = tmp_path / "audio.txt"
    listed.write_text("".join(f"{p}\n" for p in sorted(three["audio"].rglob("*.wav"))))
    data = mj.datasets.Mixed({"image": mj.datasets.Files("image", str(tmp_path / "shards")),
                              "audio": mj.datasets.Files("audio", str(listed))})
    r = load_recipe(MIXED_RECIPE, TINY_MIXED + ["train.steps=2", f"run.dir={tmp_path / 'run'}"])
    run = mj.pretrain(r, data=data)
    saved = mj.load(run / "last.pt").recipe
    expected = [("image", str(tmp_path / "shards")), ("audio", str(listed))]
    assert [(s.modality, s.path) for s in saved.sources] == expected
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and {"loss_prediction_image", "loss_prediction_audio"} <= rows[-1].keys()
