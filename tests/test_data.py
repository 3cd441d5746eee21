import io
import tarfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import IMAGE_RECIPE, TINY_IMAGE
from multijepa.datasets.files import (FileDataset, MaskCollate, ShardDataset, StepBatchSampler, build_train_loader,
                                      list_folder, read_filelist, shard_urls, write_shards)
from multijepa.datasets.readers import EXTENSIONS, modality_of, read_image
from multijepa.errors import DataError, DecodeError
from multijepa.recipe import load_recipe


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
    index = list_folder(shapes, EXTENSIONS["image"])
    assert index.classes == ["circle", "cross", "square", "triangle"] and len(index.files) == 32
    assert sorted(set(index.labels)) == [0, 1, 2, 3]
    flat = tmp_path / "flat"
    flat.mkdir()
    save(Image.new("RGB", (4, 4)), flat / "a.png")
    assert list_folder(flat, EXTENSIONS["image"]).labels == [-1]


def test_list_folder__empty_or_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="holds no files of type"):
        list_folder(tmp_path, EXTENSIONS["image"])
    with pytest.raises(DataError, match="no such folder"):
        list_folder(tmp_path / "missing", EXTENSIONS["image"])


def test_read_filelist__paths_labels_comments_and_missing(tmp_path, shapes):
    files = sorted(shapes.rglob("*.png"))[:3]
    lst = tmp_path / "list.txt"
    lst.write_text(f"# comment\n{files[0]} cat\n\n{files[1]} dog\n{files[2]}\n")
    index = read_filelist(lst)
    assert index.files == [str(f) for f in files] and index.labels == [0, 1, -1] and index.classes == ["cat", "dog"]
    lst.write_text(f"{files[0]}\nmissing.png\n")
    with pytest.raises(DataError, match="line 2: missing.png does not exist"):
        read_filelist(lst)


def test_step_batch_sampler__deterministic_resumable_and_rank_disjoint():
    full = iter(StepBatchSampler(10, 4, seed=1))
    first = [next(full) for _ in range(6)]
    resumed = iter(StepBatchSampler(10, 4, seed=1, start_step=3))
    assert [next(resumed) for _ in range(3)] == first[3:]
    r0, r1 = (iter(StepBatchSampler(10, 2, seed=1, rank=r, world=2)) for r in (0, 1))
    b0, b1 = next(r0), next(r1)
    assert [i for _, i in b0 + b1] == [i for _, i in first[0]]
    epoch = [i for batch in first[:2] for _, i in batch] + [i for _, i in first[2][:2]]
    assert sorted(epoch) == list(range(10))  # one epoch is a permutation


def test_file_dataset__training_skips_bad_files_and_reports_them(tmp_path, shapes):
    recipe = load_recipe(IMAGE_RECIPE, TINY_IMAGE)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    index = list_folder(shapes, EXTENSIONS["image"])
    index.files.insert(0, str(bad))
    index.labels.insert(0, 0)
    sample = FileDataset(index, recipe, train=True)[(0, 0)]
    assert sample["input"].shape == (3, 16, 16) and len(sample["bad"]) == 1 and str(bad) in sample["bad"][0]
    with pytest.raises(DecodeError, match="bad.png"):
        FileDataset(index, recipe, train=False)[0]


def test_file_dataset__augmentation_seeded_by_step_and_index(shapes):
    recipe = load_recipe(IMAGE_RECIPE, TINY_IMAGE)
    ds = FileDataset(list_folder(shapes, EXTENSIONS["image"]), recipe, train=True)
    assert torch.equal(ds[(3, 5)]["input"], ds[(3, 5)]["input"])
    assert not torch.equal(ds[(3, 5)]["input"], ds[(4, 5)]["input"])


def test_train_loader__batches_carry_masks(shapes):
    recipe = load_recipe(IMAGE_RECIPE, TINY_IMAGE + [f"data.path={shapes}"])
    batch = next(iter(build_train_loader(recipe)))
    assert batch["input"].shape == (8, 3, 16, 16) and batch["label"].shape == (8,)
    assert batch["context_idx"].shape[0] == 8 and batch["target_idx"].shape[:2] == (8, 4)


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
    assert batch["input"].shape == (8, 3, 16, 16)
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
