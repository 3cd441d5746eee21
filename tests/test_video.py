"""Video: both readers (decord and the PyAV fallback) on every container, variable frame rates, clip
sampling, resize and crop, bad files, the memory bound, the tubelet tokenizer, tube masks, the recipe,
training data, and the CLI end to end (pretrain, resume, embed with either backend)."""

import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY, run_cli
from multijepa.core.masking import sample_block_masks
from multijepa.datasets.files import FileDataset, list_folder, load_input
from multijepa.datasets.mixed import build_train_loader
from multijepa.datasets.shards import ShardDataset, write_shards
from multijepa.embed import Embedder
from multijepa.errors import DecodeError, MultijepaError, RecipeError
from multijepa.modalities import MODALITIES, modality_of
from multijepa.modalities import video as video_modality
from multijepa.modalities.video import clip_indices, clip_starts, read_clips
from multijepa.readers import video as video_reader
from multijepa.readers.video import decord_available, open_video, output_size, resolve_backend
from multijepa.recipe import VideoConfig, load_recipe, token_grid
from multijepa.tokenizers.video import video_tokenizer
from multijepa.train import build_model
from video_files import CODECS, make_video_folder, pattern, write_video

VIDEO_RECIPE = ROOT / "recipes/video.yaml"
# The KTH sample clips sit beside the repository, in ../shared, which a fresh clone lacks: the tests that
# read them skip there. MULTIJEPA_KTH points them at another copy (or at nothing, to see them skip).
KTH = Path(os.environ.get("MULTIJEPA_KTH", ROOT.parent / "shared/data/video/kth-dev"))
needs_kth = pytest.mark.skipif(not KTH.is_dir(), reason=f"no KTH sample clips at {KTH} (../shared is not beside "
                                                        f"this clone; MULTIJEPA_KTH names another copy)")
needs_decord = pytest.mark.skipif(not decord_available(), reason="decord is not installed (no wheels for macOS, ARM)")
# 4 frames of 32 px in 2 x 8 x 8 tubelets: a (2, 4, 4) grid.
TINY_VIDEO = TINY + ["video.frames=4", "video.frame_stride=2", "video.size=32", "video.patch_size=8",
                     "video.embed_clips=3", "mask.min_context=2", "train.threads=1"]
BACKENDS = ("decord", "pyav")  # both readers, for the tests that compare them (they need decord)
EACH_BACKEND = [pytest.param("decord", marks=needs_decord), "pyav"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """The same 12-frame pattern (32 x 64 px) in every container."""
    root = tmp_path_factory.mktemp("videos")
    return {ext: write_video(root / f"p.{ext}", pattern(12, 32, 64)) for ext in CODECS}


@pytest.fixture(scope="module")
def avis(tmp_path_factory):
    """The 40-frame pattern (1.6 s at 25 fps, 32 x 64 px) in AVIs whose frames carry times or not:
    MPEG-4 (both readers get times), MPEG-4 with B-frames and H.264 (see the test that reads them)."""
    root = tmp_path_factory.mktemp("avi")
    x = pattern(40, 32, 64)
    return {"mpeg4": write_video(root / "mpeg4.avi", x), "mpeg4-bframes": write_video(root / "bf.avi", x, bframes=2),
            "h264": write_video(root / "h264.avi", x, codec="libx264", bframes=2)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_video_folder(tmp_path_factory.mktemp("labelled"))


# --------------------------------------------------------------------------- reading


@pytest.mark.parametrize("ext", sorted(CODECS))
@needs_decord
def test_read_video__decord_and_pyav_agree_on_count_and_content(clips, ext):
    out = {}
    for backend in BACKENDS:
        with open_video(clips[ext], backend=backend) as v:
            assert v.num_frames == 12
            np.testing.assert_allclose(v.timestamps, np.arange(12) / 25, atol=1e-3)
            out[backend] = v.read([0, 7, 3, 11, 11]).astype(np.float32)
    assert out["decord"].shape == (5, 32, 64, 3)
    assert np.abs(out["decord"] - out["pyav"]).mean() < 0.5  # the same decoder library under both
    red = out["pyav"][..., 0].mean((1, 2))
    np.testing.assert_allclose(red, [0, 140, 60, 220, 220], rtol=0.05, atol=3)  # in the asked order


@needs_decord
def test_decord__frame_widths_it_cannot_copy_are_read_with_pyav(tmp_path):
    path = write_video(tmp_path / "narrow.avi", pattern(6, 32, 48))  # decord 0.6 fails on 48 px wide frames
    with open_video(path, backend="decord") as v:
        frames = v.read([1, 4])
        assert v.fallback is not None and v.frames_decoded >= 2
    with open_video(path, backend="pyav") as v:
        np.testing.assert_array_equal(frames, v.read([1, 4]))


@needs_decord
def test_read_video__variable_frame_rate_by_timestamp(tmp_path):
    path = write_video(tmp_path / "vfr.mkv", pattern(10), frame_ms=[40, 120])  # 25 fps, then 8.3 fps
    expected = np.cumsum([0] + [40, 120] * 5)[:10] / 1000
    cfg = VideoConfig(frames=5, fps=10)
    for backend in BACKENDS:
        with open_video(path, backend=backend) as v:
            np.testing.assert_allclose(v.timestamps, expected, atol=1e-3)
            # Sampling times 0, .1, .2, .3, .4 s -> the frame on screen at each.
            assert clip_indices(v.timestamps, cfg, 0.0) == [0, 1, 3, 3, 5]


@pytest.mark.parametrize("backend", EACH_BACKEND)
@pytest.mark.parametrize("kind", ["mpeg4", "mpeg4-bframes", "h264"])
def test_read_video__avi_frames_without_timestamps_get_index_times_and_the_right_frames(avis, kind, backend):
    """AVI stores no presentation times. In the H.264 AVI decord reports AV_NOPTS_VALUE for every frame
    (the real report: a 1080p H.264 AVI refused as "truncated video: its frames cover 0.00 s of the
    3.43 s its header declares") and returns wrong frames after a seek; PyAV gets FFmpeg's guess,
    pts = dts + 1, which the decoder hands back shuffled as it reorders B-frames (1, 3, 4, 2, ...),
    so telling frames apart by pts read the wrong ones. With MPEG-4 B-frames decord misses the first
    frames' times. Each must read as 40 frames 0.04 s apart, the asked frames in the asked order."""
    path = avis[kind]
    if backend == "decord":  # what this file reproduces
        import decord

        raw = decord.VideoReader(str(path), ctx=decord.cpu(0)).get_frame_timestamp(np.arange(40))[:, 0]
        assert (raw < -1e9).any() == (kind != "mpeg4")  # AV_NOPTS_VALUE x time base
    else:
        import av

        with av.open(str(path)) as container:
            decoded_pts = [f.pts for f in container.decode(video=0)]
        assert (np.diff(decoded_pts) < 0).any() == (kind == "h264")
    with open_video(path, backend=backend) as v:
        assert v.num_frames == 40
        np.testing.assert_allclose(v.timestamps, np.arange(40) / 25, atol=1e-3)  # 1.56 s: the real span
        picks = [30, 2, 17, 5, 39, 24, 24]
        red = v.read(picks)[..., 0].mean((1, 2))
        assert clip_indices(v.timestamps, VideoConfig(frames=4, fps=12.5), 1.0) == [25, 27, 29, 31]
    np.testing.assert_allclose(red, [20 * i % 256 for i in picks], atol=8)  # red 20 * t: neighbours 20 apart
    cfg = VideoConfig(frames=4, frame_stride=4, size=32, patch_size=8, backend=backend)
    assert [c.shape for c in read_clips(path, cfg, count=3)] == [(3, 4, 32, 32)] * 3


@pytest.mark.parametrize("backend", EACH_BACKEND)
def test_read_video__cut_avi_without_timestamps_is_refused_as_truncated(avis, tmp_path, backend):
    path = tmp_path / "cut.avi"
    data = avis["h264"].read_bytes()
    path.write_bytes(data[:int(len(data) * 0.9)])  # its last tenth lost in a copy
    with pytest.raises(DecodeError, match=r"truncated video: found \d+ of the 40 frames") as err:
        read_clips(path, VideoConfig(frames=4, backend=backend))
    assert str(path) in str(err.value)


def test_read_video__pyav_reads_a_stream_with_no_timestamps_at_all(tmp_path):
    """A raw H.264 stream: PyAV sees pts and dts None on every packet and frame, and no frame count
    or duration (decord cannot open it). Times come from the frame rate, frames by counting."""
    path = write_video(tmp_path / "raw.h264", pattern(24, 32, 64), codec="libx264", bframes=2)
    with open_video(path, backend="pyav") as v:
        assert v.num_frames == 24
        np.testing.assert_allclose(v.timestamps, np.arange(24) / 25, atol=1e-3)
        picks = [20, 3, 11, 11, 0]
        np.testing.assert_allclose(v.read(picks)[..., 0].mean((1, 2)), [20 * i % 256 for i in picks], atol=8)


def test_clip_indices__stride_fps_and_short_videos_repeat_the_last_frame():
    stamps = np.arange(20) / 25
    assert clip_indices(stamps, VideoConfig(frames=4, frame_stride=3), 5) == [5, 8, 11, 14]
    assert clip_indices(stamps[:6], VideoConfig(frames=4, frame_stride=3), 0) == [0, 3, 5, 5]
    assert clip_indices(stamps, VideoConfig(frames=3, fps=12.5), 0.0) == [0, 2, 4]  # every 2nd at 25 fps


def test_clip_starts__random_in_training_evenly_spread_for_embedding():
    stamps = np.arange(40) / 25
    cfg = VideoConfig(frames=8, frame_stride=2)  # 15 frames per clip: starts 0..25
    assert clip_starts(stamps, cfg, 4) == [0.0, 8.0, 17.0, 25.0]
    assert clip_starts(stamps[:10], cfg, 4) == [0.0]  # too short for two distinct clips
    starts = {clip_starts(stamps, cfg, 1, torch.Generator().manual_seed(s))[0] for s in range(50)}
    assert min(starts) >= 0 and max(starts) <= 25 and len(starts) > 10
    timed = clip_starts(stamps, VideoConfig(frames=4, fps=5.0), 3)  # 0.6 s clips in 1.56 s
    np.testing.assert_allclose(timed, [0.0, 0.48, 0.96])


@needs_decord
def test_read_clips__resize_crop_and_channels(tmp_path):
    path = write_video(tmp_path / "wide.mp4", pattern(12, 48, 96))
    cfg = VideoConfig(frames=4, frame_stride=2, size=32, patch_size=8)
    for backend in BACKENDS:
        c = dataclasses.replace(cfg, backend=backend)
        embedded = read_clips(path, c, count=2)
        assert [x.shape for x in embedded] == [(3, 4, 32, 32)] * 2
        g = torch.Generator().manual_seed(0)
        assert read_clips(path, c, g=g)[0].shape == (3, 4, 32, 32)
    a = read_clips(path, dataclasses.replace(cfg, backend="decord"), g=torch.Generator().manual_seed(3))
    b = read_clips(path, dataclasses.replace(cfg, backend="pyav"), g=torch.Generator().manual_seed(3))
    assert (a[0] - b[0]).abs().mean() < 0.05  # the same crop of the same frames
    gray = read_clips(path, dataclasses.replace(cfg, channels=1, mean=(0.5,), std=(0.5,)))
    assert gray[0].shape == (1, 4, 32, 32)
    assert output_size(1920, 1080, 64) == (114, 64) and output_size(40, 30, 64) == (40, 30)


def test_read_video__bytes_use_the_given_name(clips):
    data = Path(clips["webm"]).read_bytes()
    with open_video(data, name="shard.tar:k.webm", backend="pyav") as v:
        assert v.num_frames == 12
    with pytest.raises(DecodeError, match="shard.tar:bad.mp4"):
        read_clips(b"not a video" * 50, VideoConfig(), name="shard.tar:bad.mp4")


def _bad(kind: str, clips, tmp_path) -> Path:
    if kind in ("empty", "text", "png"):
        content = {"empty": b"", "text": b"hello, I am not a video\n" * 40,
                   "png": bytes.fromhex("89504e470d0a1a0a") + bytes(300)}[kind]
        path = tmp_path / f"{kind}.mp4"
        path.write_bytes(content)
        return path
    ext, fraction = kind.split("@")
    data = Path(clips[ext]).read_bytes()
    path = tmp_path / f"cut.{ext}"
    path.write_bytes(data[:int(len(data) * float(fraction))])
    return path


@pytest.mark.parametrize("backend", EACH_BACKEND)
@pytest.mark.parametrize("kind,match", [
    ("empty", "empty"), ("text", "cannot open as a video"),
    ("png", "cannot open as a video|no video stream|no frame size"),
    ("mp4@0.5", "cannot open"), ("avi@0.5", "cannot open"), ("avi@0.9", "truncated"),
    ("mkv@0.5", "truncated"), ("webm@0.6", "truncated|cannot"),
])
def test_read_video__corrupt_empty_and_truncated_files_raise_naming_the_file(clips, tmp_path, backend, kind, match):
    path = _bad(kind, clips, tmp_path)
    with pytest.raises(DecodeError, match=match) as err:
        read_clips(path, VideoConfig(frames=4, backend=backend))
    assert str(path) in str(err.value) and ("remove" in str(err.value) or "re-" in str(err.value))


def test_read_video__missing_file_and_audio_only_file(tmp_path):
    with pytest.raises(DecodeError, match="nope.mp4: no such file"):
        read_clips(tmp_path / "nope.mp4", VideoConfig())
    import soundfile as sf

    sf.write(tmp_path / "sound.wav", np.zeros(800, np.float32), 8000)
    (tmp_path / "sound.wav").rename(tmp_path / "sound.mkv")  # a container with audio and no video
    with pytest.raises(DecodeError, match="sound.mkv: the file holds no video stream"):
        read_clips(tmp_path / "sound.mkv", VideoConfig())


@pytest.fixture(scope="module")
def long_video(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("long") / "long.mp4", pattern(240, 360, 640), gop=24)  # 9.6 s


@pytest.mark.parametrize("backend", EACH_BACKEND)
def test_read_clips__long_high_resolution_video_keeps_only_the_clip_frames(long_video, monkeypatch, backend):
    path = long_video
    opened = []
    opens = video_reader.open_video

    @contextlib.contextmanager
    def recording(*args, **kwargs):
        with opens(*args, **kwargs) as video:
            opened.append(video)
            yield video

    monkeypatch.setattr(video_modality, "open_video", recording)  # the name read_clips opens videos by
    cfg = VideoConfig(frames=8, frame_stride=2, size=32, patch_size=8, backend=backend)
    out = read_clips(path, cfg, count=4)
    assert len(out) == 4 and out[0].shape == (3, 8, 32, 32)
    v = opened[0]
    assert isinstance(v.reader, video_reader.BACKENDS[backend])
    assert v.size == (57, 32)  # decoded at the short side the clip needs, not 640 x 360
    assert v.peak_frames_held <= 8  # one clip's frames at a time
    # PyAV decodes from the key frame before each clip (GOP 24) up to the clip's last frame; decord
    # decodes what get_batch asks for. Either way far fewer than the 240 frames of the video.
    assert v.frames_decoded <= 4 * (15 + 24) and v.frames_decoded < 240 * 0.75
    assert clip_starts(v.timestamps, cfg, 4) == [0.0, 75.0, 150.0, 225.0]  # spread over the whole video
    # The first frame of each clip is frame 0, 75, 150, 225: red 20 * t mod 256 tells which.
    red = [round(float(c[0, 0].mean() * 0.229 + 0.485) * 255) for c in out]
    assert red == pytest.approx([0, 220, 184, 148], abs=8)


def test_backend__auto_falls_back_to_pyav_where_decord_is_missing(monkeypatch, clips):
    assert resolve_backend("auto") == ("decord" if decord_available() else "pyav")
    monkeypatch.setitem(sys.modules, "decord", None)  # import decord now raises ImportError
    assert resolve_backend("auto") == "pyav"
    with pytest.raises(MultijepaError, match="decord is not installed.*video.backend=auto or pyav"):
        resolve_backend("decord")
    assert read_clips(clips["mp4"], VideoConfig(frames=4))[0].shape == (3, 4, 64, 64)


def test_video_extensions__are_read_as_video():
    assert all(modality_of(f"x.{ext}") == "video" for ext in CODECS)
    assert ".mov" in MODALITIES["video"].extensions


# --------------------------------------------------------------------------- tokenizer, masks, recipe


def test_video_tokenizer__shapes_coords_in_grid_order_and_backward():
    tok = video_tokenizer(channels=3, tubelet_size=2, patch_size=8, dim=16)
    x = torch.randn(2, 3, 6, 16, 24, requires_grad=True)
    tokens, coords = tok(x)
    assert tokens.shape == (2, 3 * 2 * 3, 16) and coords.shape == (2, 18, 3)
    assert coords[0].reshape(3, 2, 3, 3)[2, 1, 0].tolist() == [2.0, 1.0, 0.0]  # (t, row, col), C order
    assert torch.isfinite(tokens).all()
    tokens.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # A token depends on its own tubelet only: change frame 5 and only t = 2 tokens move.
    y = x.detach().clone()
    y[:, :, 5] += 1
    moved = (tok(y)[0] - tokens.detach()).abs().sum(-1).reshape(2, 3, 6)
    assert (moved[:, :2] == 0).all() and (moved[:, 2] > 0).all()


def test_video_masks__target_blocks_are_tubes_through_every_frame():
    assert load_recipe(VIDEO_RECIPE).mask.full_span_axes == ()  # the recipe's boxes; tubes on request
    recipe = load_recipe(VIDEO_RECIPE, ["mask.full_span_axes=[0]"])
    grid = token_grid(recipe)
    assert grid == (4, 4, 4) and recipe.mask.full_span_axes == (0,)
    context, targets = sample_block_masks(grid, recipe.mask, 16, torch.Generator().manual_seed(0))
    for b in range(16):
        for block in targets[b]:
            cells = {(int(i) // 16, int(i) % 16) for i in block}
            plane = {c for _, c in cells}
            assert cells == {(t, c) for t in range(4) for c in plane}  # every frame, the same place
        assert not set(context[b].tolist()) & set(targets[b].flatten().tolist())


@pytest.mark.parametrize("override,key", [
    ("video.tubelet_size=3", "video.tubelet_size"), ("video.patch_size=10", "video.patch_size"),
    ("video.frame_stride=0", "video.frame_stride"), ("video.fps=-1", "video.fps"),
    ("video.embed_clips=0", "video.embed_clips"), ("video.channels=1", "video.mean"),
    ("video.crop_scale=[0.5,0.2]", "video.crop_scale"), ("mask.full_span_axes=[3]", "mask.full_span_axes"),
    ("mask.full_span_axes=[0,1,2]", "mask.full_span_axes"), ("mask.target_scale=[0.9,1.0]", "mask.target_scale"),
    ("video.backend=opencv", "video.backend"), ("video.frame=4", "video.frame"),
])
def test_video_recipe__impossible_values_name_the_key(override, key):
    with pytest.raises(RecipeError, match=f"recipes/video.yaml.*'{key}'"):
        load_recipe(VIDEO_RECIPE, [override])


def test_video_recipe__documented_vjepa_vitl_variant_loads():
    text = VIDEO_RECIPE.read_text()
    block = text.split("V-JEPA ViT-L/16 variant")[1].split("modality:")[0]
    overrides = re.findall(r"\b[a-z_]+\.[a-z_]+=\S+", block)
    recipe = load_recipe(VIDEO_RECIPE, overrides)
    assert token_grid(recipe) == (8, 14, 14) and recipe.model.dim == 1024
    tokens, coords = video_tokenizer(3, 2, 16, 8)(torch.zeros(1, 3, 16, 224, 224))
    assert tokens.shape[1] == 8 * 14 * 14


def test_video_model__forward_backward_on_the_tiny_recipe():
    recipe = load_recipe(VIDEO_RECIPE, TINY_VIDEO)
    model = build_model(recipe)
    x = torch.randn(3, 3, 4, 32, 32)
    context, targets = sample_block_masks(token_grid(recipe), recipe.mask, 3, torch.Generator().manual_seed(0))
    out = model({"video": {"input": x, "context_idx": context, "target_idx": targets}})
    out["loss"].backward()
    assert torch.isfinite(out["loss"])


# --------------------------------------------------------------------------- data sets and training


def test_file_dataset__video_folder_labels_and_bad_files_skipped(tmp_path, folder):
    recipe = load_recipe(VIDEO_RECIPE, TINY_VIDEO + [f"data.path={folder}", "data.batch_size=4"])
    index = list_folder(folder, MODALITIES["video"].extensions)
    assert index.classes == ["left", "right"] and len(index.files) == 8
    bad = tmp_path / "bad.avi"
    bad.write_bytes(Path(index.files[1]).read_bytes()[:2000])
    index.files.insert(0, str(bad))
    index.labels.insert(0, 0)
    sample = FileDataset(index, recipe, train=True)[(0, 0)]
    assert sample["input"].shape == (3, 4, 32, 32) and len(sample["bad"]) == 1 and "bad.avi" in sample["bad"][0]
    with pytest.raises(DecodeError, match="bad.avi"):
        FileDataset(index, recipe, train=False)[0]
    batch = next(iter(build_train_loader(recipe)))["parts"]["video"]
    assert batch["input"].shape == (4, 3, 4, 32, 32) and batch["target_idx"].shape[:2] == (4, 4)
    assert load_input(index.files[1], recipe).shape == (3, 4, 32, 32)
    assert [v.shape for v in MODALITIES["video"].embed_views(index.files[1], recipe.video, "x")[0]] == [(3, 4, 32, 32)] * 3


def test_write_shards__video_round_trip_and_training_stream(tmp_path, folder):
    urls = write_shards(folder, tmp_path / "shards", per_shard=4)
    recipe = load_recipe(VIDEO_RECIPE, TINY_VIDEO + [f"data.path={tmp_path / 'shards'}", "data.batch_size=4"])
    stream = iter(ShardDataset(urls, recipe, buffer=2))
    samples = [next(stream) for _ in range(6)]
    assert all(s["input"].shape == (3, 4, 32, 32) and not s["bad"] for s in samples)
    assert next(iter(build_train_loader(recipe)))["parts"]["video"]["input"].shape == (4, 3, 4, 32, 32)


def test_pretrain__bad_videos_are_skipped_and_counted(tmp_path, folder):
    from multijepa.train import pretrain

    data = tmp_path / "mixed"
    data.mkdir()
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for k, p in enumerate(files):
        (data / f"{k}{p.suffix}").write_bytes(p.read_bytes())
    (data / "cut.mp4").write_bytes(files[0].read_bytes()[:1500])
    (data / "empty.mkv").write_bytes(b"")
    base = TINY_VIDEO + [f"data.path={data}", f"run.dir={tmp_path / 'run'}", "data.batch_size=4"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pretrain(load_recipe(VIDEO_RECIPE, base + ["data.max_bad_fraction=0.5", "train.steps=4"]))
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["bad_files"] > 0 and all(math.isfinite(r["loss"]) for r in rows)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def trained(tmp_path_factory, folder):
    root = tmp_path_factory.mktemp("cli")
    args = [str(VIDEO_RECIPE), *TINY_VIDEO, f"data.path={folder}", "run.dir=runs/video", "data.batch_size=4",
            "train.checkpoint_every=2", "data.num_workers=1"]  # decoding in a DataLoader worker
    run_cli("pretrain", *args, "train.steps=2", cwd=root)
    resumed = run_cli("pretrain", *args, "train.steps=4", cwd=root)
    assert "resuming" in resumed.stderr
    rows = [json.loads(line) for line in (root / "runs/video/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    run_cli("pretrain", *args, "train.steps=4", "run.dir=straight", cwd=root)
    straight = [json.loads(line) for line in (root / "straight/metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in straight], rel=1e-4)  # same curve
    return root


def _embed_with_both_backends(trained: Path, files: list[str], out: str) -> None:
    """``multijepa embed FILES`` (the newest video run; auto = decord where installed) gives one finite
    vector per file, and the PyAV reader the same vectors."""
    run_cli("embed", *files, "--out", out, cwd=trained)
    vectors = np.load(trained / out)
    assert vectors.shape == (len(files), 32) and np.isfinite(vectors).all()
    model = Embedder.from_checkpoint(trained / "runs/video/last.pt", device="cpu")
    with_pyav = model.with_overrides(["video.backend=pyav"]).embed(files)
    np.testing.assert_allclose(with_pyav, vectors, atol=2e-3)  # the fallback reads the same frames


def test_video_embed__generated_files_in_every_container_with_both_backends(trained, clips, avis):
    files = [str(clips[ext]) for ext in sorted(CODECS)] + [str(avis["h264"]), str(avis["mpeg4-bframes"])]
    _embed_with_both_backends(trained, files, "generated.npy")


@needs_kth
def test_video_embed__kth_clips_with_both_backends(trained):
    files = sorted(str(p) for p in KTH.rglob("*") if p.suffix in (".avi", ".mp4"))
    assert len(files) == 7
    _embed_with_both_backends(trained, files, "kth.npy")


def test_video_embed__one_vector_per_clip_and_clip_count(trained, clips, avis):
    files = [str(clips["mp4"]), str(avis["h264"])]
    run_cli("embed", *files, "--windows", "--clips", "2", "--out", "w.jsonl", cwd=trained)
    rows = [json.loads(line) for line in (trained / "w.jsonl").read_text().splitlines()]
    assert [(r["file"], r["window"]) for r in rows] == [(f, k) for f in files for k in range(2)]
    model = Embedder.from_checkpoint(trained / "runs/video/last.pt", device="cpu")
    model = model.with_overrides(["video.embed_clips=2"])
    pooled = model.embed([files[1]])[0]
    np.testing.assert_allclose(pooled, np.mean([r["embedding"] for r in rows[2:]], axis=0), atol=1e-4)
    per_clip_tokens = model.embed([files[1]], tokens=True, windows=True)
    assert [t.shape for t in per_clip_tokens] == [(2, 2 * 4 * 4, 32)]  # clips x tokens x dim
    with pytest.raises(MultijepaError, match="2 windows"):
        model.embed([files[1]], tokens=True)
    bad = run_cli("embed", files[0], "--window", "1", cwd=trained, check=False)
    assert bad.returncode != 0 and "--window and --hop apply to audio" in bad.stderr


def test_video_probe__labelled_folder_through_the_cli(trained, folder):
    out = run_cli("probe", str(folder), "--checkpoint", str(trained / "runs/video/last.pt"), "--workers", "0",
                  "--test-fraction", "0.5", "--json", cwd=trained).stdout
    result = json.loads(out.splitlines()[-1])
    assert result["n_train"] + result["n_test"] == 8 and 0 <= result["linear"] <= 1
