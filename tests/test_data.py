import io
import tarfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import IMAGE_RECIPE, TINY_IMAGE
from multijepa.datasets.files import FileDataset, list_folder, read_filelist
from multijepa.datasets.mixed import MaskCollate, MixPlan, build_train_loader, step_keys
from multijepa.datasets.shards import ShardDataset, shard_urls, write_shards
from multijepa.errors import DataError, DecodeError
from multijepa.modalities import MODALITIES, modality_of
from multijepa.readers import read_image
from multijepa.recipe import load_recipe

IMAGE_EXTENSIONS = MODALITIES["image"].extensions


def save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


@pytest.mark.parametrize("fmt,mode", [("JPEG", "RGB"), ("PNG", "RGBA"), ("PNG", "L"), ("WEBP", "RGB"),
                                      ("PNG", "P"), ("BMP", "RGB"), ("TIFF", "RGB"), ("GIF", "P")])
def test_read_image__formats_converted_to_requested_channels(tmp_path, fmt, mode):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (10, 12, 3), dtype=np.uint8)).convert(mode)
    path = save(img, tmp_path / f"x.{fmt.lower()}", format=fmt)
    assert read_image(path).shape == (3, 10, 12) and read_image(path).dtype == torch.uint8
    assert read_image(path, channels=1).shape == (1, 10, 12)


def test_read_image__rgb_values_preserved(tmp_path):
    arr = np.random.default_rng(0).integers(0, 255, (6, 7, 3), dtype=np.uint8)
    path = save(Image.fromarray(arr), tmp_path / "x.png")
    assert np.array_equal(read_image(path).permute(1, 2, 0).numpy(), arr)


def jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("name,content,match", [
    ("empty.jpg", b"", "empty"),
    ("text.png", b"hello, I am not an image\n" * 10, "cannot decode"),
    ("garbage.jpg", bytes(range(256)) * 4, "cannot decode"),
    ("truncated.jpg", None, "cannot decode"),
])
def test_read_image__bad_files_raise_naming_the_file(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_bytes(content if content is not None else jpeg_bytes()[:200])
    with pytest.raises(DecodeError, match=match) as e:
        read_image(path)
    assert str(path) in str(e.value)


def test_read_image__missing_file_and_folder(tmp_path):
    with pytest.raises(DecodeError, match="no such file"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(DecodeError, match="folder"):
        read_image(tmp_path)


def test_modality_of__by_extension():
    assert modality_of("a/B.JPEG") == "image"
    with pytest.raises(DecodeError, match="unknown file type '.xyzzy'"):
        modality_of("a.xyzzy")


def test_list_folder__labels_from_subfolders_and_unlabelled_root(tmp_path, shapes):
    index = list_folder(shapes, IMAGE_EXTENSIONS)
    assert index.classes == ["circle", "cross", "square", "triangle"] and len(index.files) == 32
    assert sorted(set(index.labels)) == [0, 1, 2, 3]
    flat = tmp_path / "flat"
    flat.mkdir()
    save(Image.new("RGB", (4, 4)), flat / "a.png")
    assert list_folder(flat, IMAGE_EXTENSIONS).labels == [-1]


def test_list_folder__empty_or_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="holds no files of type"):
        list_folder(tmp_path, IMAGE_EXTENSIONS)
    with pytest.raises(DataError, match="no such folder"):
        list_folder(tmp_path / "missing", IMAGE_EXTENSIONS)


def test_read_filelist__paths_labels_comments_and_missing(tmp_path, shapes):
    files = sorted(shapes.rglob("*.png"))[:3]
    lst = tmp_path / "list.txt"
    lst.write_text(f"# comment\n{files[0]} cat\n\n{files[1]} dog\n{files[2]}\n")
    index = read_filelist(lst)
    assert index.files == [str(f) for f in files] and index.labels == [0, 1, -1] and index.classes == ["cat", "dog"]
    lst.write_text(f"{files[0]}\nmissing.png\n")
    with pytest.raises(DataError, match="line 2: missing.png does not exist"):
        read_filelist(lst)


def test_step_keys__one_source_deterministic_resumable_and_rank_disjoint():
    recipe = load_recipe(IMAGE_RECIPE, TINY_IMAGE + ["data.batch_size=4", "train.seed=1"])
    plan = MixPlan(recipe)
    first = [step_keys(plan, [10], step) for step in range(6)]
    assert all(len(keys) == 4 and {k for k, _ in keys} == {0} for keys in first)  # one source: source 0
    resumed = MixPlan(recipe)  # a fresh plan asked for step 3 first, as a resumed run asks
    assert [step_keys(resumed, [10], step) for step in range(3, 6)] == first[3:]
    halves = load_recipe(IMAGE_RECIPE, TINY_IMAGE + ["data.batch_size=2", "train.seed=1"])
    b0, b1 = (step_keys(MixPlan(halves), [10], 0, rank, world=2) for rank in (0, 1))
    assert [i for _, i in b0 + b1] == [i for _, i in first[0]]  # the global batch, split between ranks
    epoch = [i for keys in first[:2] for _, i in keys] + [i for _, i in first[2][:2]]
    assert sorted(epoch) == list(range(10))  # one epoch is a permutation


def _same_batches(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] and a["parts"].keys() == b["parts"].keys() == {"image"}
    for key in ("input", "label", "context_idx", "target_idx"):
        assert torch.equal(a["parts"]["image"][key], b["parts"]["image"][key]), (a["step"], key)


def test_train_loader__batches_of_a_step_are_the_same_when_started_there_with_any_worker_count(shapes):
    recipe = load_recipe(IMAGE_RECIPE, TINY_IMAGE + [f"data.path={shapes}"])
    straight = [b for _, b in zip(range(6), build_train_loader(recipe))]  # 48 samples: past the first epoch of 32
    assert [b["step"] for b in straight] == list(range(6))
    resumed = [b for _, b in zip(range(3), build_train_loader(recipe, start_step=3))]
    workers = load_recipe(IMAGE_RECIPE, TINY_IMAGE + [f"data.path={shapes}", "data.num_workers=2"])
    for a, b in zip(straight[3:] + straight, resumed + [b for _, b in zip(range(6), build_train_loader(workers))]):
        _same_batches(a, b)
    assert not torch.equal(straight[0]["parts"]["image"]["input"], straight[1]["parts"]["image"]["input"])


def test_train_loader__ranks_take_disjoint_halves_of_the_global_batch(shapes):
    whole = load_recipe(IMAGE_RECIPE, TINY_IMAGE + [f"data.path={shapes}", "data.batch_size=8"])
    half = load_recipe(IMAGE_RECIPE, TINY_IMAGE + [f"data.path={shapes}", "data.batch_size=4"])
    steps = 4  # one epoch of the 32 images
    single = [b["parts"]["image"] for _, b in zip(range(steps), build_train_loader(whole))]
    ranks = [[b["parts"]["image"] for _, b in zip(range(steps), build_train_loader(half, rank=r, world=2))]
             for r in (0, 1)]
    for step in range(steps):
        r0, r1 = ranks[0][step], ranks[1][step]
        assert len(r0["input"]) == len(r1["input"]) == 4
        # A sample's crop is seeded by (seed, step, sample): rank r's half is exactly its run of the global batch.
        assert torch.equal(torch.cat([r0["input"], r1["input"]]), single[step]["input"])
        assert torch.equal(torch.cat([r0["label"], r1["label"]]), single[step]["label"])
        # The same sample at the same step has the same crop: distinct rows mean the ranks share no sample.
        rows = {tuple(x.flatten().tolist()) for x in torch.cat([r0["input"], r1["input"]])}
        assert len(rows) == 8
    assert not torch.equal(ranks[0][0]["target_idx"], ranks[1][0]["target_idx"])  # each rank draws its own masks


def test_file_dataset__training_skips_bad_files_and_reports_them(tmp_path, shapes):
    recipe = load_recipe(IMAGE_RECIPE, TINY_IMAGE)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    index = list_folder(shapes, IMAGE_EXTENSIONS)
    index.files.insert(0, str(bad))
    index.labels.insert(0, 0)
    sample = FileDataset(index, recipe, train=True)[(0, 0)]
    assert sample["input"].shape == (3, 16, 16) and len(sample["bad"]) == 1 and str(bad) in sample["bad"][0]
    with pytest.raises(DecodeError, match="bad.png"):
        FileDataset(index, recipe, train=False)[0]


def test_file_dataset__augmentation_seeded_by_step_and_index(shapes):
    recipe = load_recipe(IMAGE_RECIPE, TINY_IMAGE)
    ds = FileDataset(list_folder(shapes, IMAGE_EXTENSIONS), recipe, train=True)
    assert torch.equal(ds[(3, 5)]["input"], ds[(3, 5)]["input"])
    assert not torch.equal(ds[(3, 5)]["input"], ds[(4, 5)]["input"])


def test_train_loader__batches_carry_masks(shapes):
    recipe = load_recipe(IMAGE_RECIPE, TINY_IMAGE + [f"data.path={shapes}"])
    batch = next(iter(build_train_loader(recipe)))
    assert batch["parts"].keys() == {"image"} and batch["step"] == 0 and batch["count"] == 8 and batch["bad"] == []
    part = batch["parts"]["image"]
    assert part["input"].shape == (8, 3, 16, 16) and part["label"].shape == (8,)
    assert part["context_idx"].shape[0] == 8 and part["target_idx"].shape[:2] == (8, 4)


def test_train_loader__too_many_bad_files_stops_with_report(tmp_path):
    from multijepa.train import pretrain

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(30):
        (folder / f"{i}.png").write_bytes(b"broken" if i % 3 == 0 else b"")
    save(Image.new("RGB", (16, 16)), folder / "ok.png")
    recipe = load_recipe(IMAGE_RECIPE, TINY_IMAGE + [f"data.path={folder}", f"run.dir={tmp_path / 'run'}",
                                                   "train.steps=50"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match="failed to decode.*max_bad_fraction"):
            pretrain(recipe)


def test_write_shards__round_trip_and_training_stream(tmp_path, shapes):
    urls = write_shards(shapes, tmp_path / "shards", per_shard=10)
    assert len(urls) == 4 and shard_urls(str(tmp_path / "shards")) == urls
    with tarfile.open(urls[0]) as tar:
        names = tar.getnames()
    assert "000000000.png" in names and "000000000.cls" in names and not list((tmp_path / "shards").glob("*.tmp"))
    recipe = load_recipe(IMAGE_RECIPE, TINY_IMAGE + [f"data.path={tmp_path / 'shards'}"])
    stream = iter(ShardDataset(urls, recipe, buffer=8))
    samples = [next(stream) for _ in range(40)]  # more than one pass: the stream is endless
    assert all(s["input"].shape == (3, 16, 16) for s in samples)
    assert {s["label"] for s in samples} == {0, 1, 2, 3}
    batch = next(iter(build_train_loader(recipe)))
    assert batch["parts"]["image"]["input"].shape == (8, 3, 16, 16)
    collate = MaskCollate(recipe)
    assert collate(samples[:4])["context_idx"].shape[0] == 4


def test_shard_urls__nothing_found(tmp_path):
    with pytest.raises(DataError, match="no webdataset shards"):
        shard_urls(str(tmp_path / "*.tar"))


def test_shard_dataset__corrupt_shard_is_named(tmp_path):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"this is not a tar file" * 100)
    recipe = load_recipe(IMAGE_RECIPE, TINY_IMAGE + [f"data.path={bad}"])
    with pytest.raises(DataError, match="bad.tar"):
        next(iter(ShardDataset([str(bad)], recipe, buffer=2)))


def test_shard_dataset__ranks_get_disjoint_samples_even_with_one_shard(tmp_path, shapes):
    urls = write_shards(shapes, tmp_path / "one", per_shard=100)
    assert len(urls) == 1
    recipe = load_recipe(IMAGE_RECIPE, TINY_IMAGE + [f"data.path={urls[0]}"])
    shares = []
    for rank in (0, 1):
        stream = iter(ShardDataset(urls, recipe, rank=rank, world=2, buffer=1))
        shares.append({next(stream)["name"] for _ in range(16)})  # one pass over this rank's half
    assert len(shares[0]) == len(shares[1]) == 16 and not shares[0] & shares[1]


@pytest.mark.parametrize("native", [True, False])
def test_transforms__resize_crop_gray_normalize_equal_torchvision(monkeypatch, native):
    """Our torch-only image ops give torchvision v2's pixels exactly (torchvision is a test dependency only)."""
    tvf = pytest.importorskip("torchvision.transforms.v2.functional")
    from multijepa import transforms

    monkeypatch.setattr(transforms, "_native_uint8_resize", lambda: native)
    if not native:  # torchvision decides by the CPU: make it take the float path too
        import torchvision.transforms.v2.functional._geometry as geometry

        monkeypatch.setattr(geometry, "_do_native_uint8_resize_on_cpu", lambda interpolation: False)
    g = torch.Generator().manual_seed(0)
    for h, w in ((37, 53), (64, 48), (32, 32), (9, 120)):
        image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
        frames = torch.randint(0, 256, (4, h, w, 3), dtype=torch.uint8, generator=g).permute(0, 3, 1, 2)
        for x in (image, frames, image.float() / 255):
            assert torch.equal(transforms.resize(x, 17, 23), tvf.resize(x, [17, 23], antialias=True))
            ours = transforms.crop_and_resize(x, 16, (0.3, 1.0), False, None)
            assert torch.equal(ours, tvf.center_crop(tvf.resize(x, [16], antialias=True), [16, 16]))
            top, left = h // 5, w // 7
            assert torch.equal(transforms.resize(x[..., top:top + h // 2, left:left + w // 2], 16, 16),
                               tvf.resized_crop(x, top, left, h // 2, w // 2, [16, 16], antialias=True))
        assert torch.equal(transforms.rgb_to_gray(frames), tvf.rgb_to_grayscale(frames))
        x = image.float() / 255
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        assert torch.equal(transforms.normalize(x, mean, std), tvf.normalize(x, list(mean), list(std)))
