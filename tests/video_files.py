"""Tiny generated videos for the tests, encoded with PyAV: a few frames of 32-96 px in each container."""

from __future__ import annotations

import fractions
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

# Container -> codec: mp4/H.264, avi/MPEG-4 part 2, webm/VP9, mkv/H.264.
CODECS = {"mp4": "libx264", "avi": "mpeg4", "webm": "libvpx-vp9", "mkv": "libx264"}


def pattern(frames: int = 12, height: int = 32, width: int = 48) -> np.ndarray:
    """uint8 [T, H, W, 3]: red brightness 20 * t (so a frame's index can be read back), a green square
    moving right 2 px per frame, a blue horizontal ramp."""
    x = np.zeros((frames, height, width, 3), np.uint8)
    for t in range(frames):
        x[t, :, :, 0] = (20 * t) % 256
        left = (2 * t) % max(1, width - 8)
        x[t, 4:12, left:left + 8, 1] = 255
        x[t, :, :, 2] = (np.arange(width) * 255 // max(1, width - 1))[None]
    return x


def write_video(path: Path, frames: np.ndarray, fps: int = 25, gop: int = 12,
                frame_ms: list[int] | None = None, codec: str | None = None, bframes: int = 0) -> Path:
    """Encode ``frames`` [T, H, W, 3] in the container the suffix names, with ``codec`` (default: the
    container's in CODECS) and ``bframes`` B-frames between references; ``frame_ms`` gives each
    frame's duration in milliseconds (a variable frame rate), else ``fps``."""
    import av

    path = Path(path)
    codec = codec or CODECS[path.suffix.lstrip(".")]
    if codec == "libvpx-vp9" and "decord" in sys.modules:
        # Once decord's bundled FFmpeg has run, PyAV cannot open the VP9 encoder in the same process
        # (decoding is unaffected): encode in a fresh one.
        return _write_in_subprocess(path, frames, fps, gop, frame_ms)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.gop_size = gop
        if bframes:
            stream.codec_context.max_b_frames = bframes  # decode order differs from presentation order
        if codec == "libx264":
            stream.options = {"crf": "8", "preset": "ultrafast"}
        elif codec == "mpeg4":
            stream.options = {"qscale": "2"}
        if frame_ms is not None:
            stream.time_base = fractions.Fraction(1, 1000)
        t = 0
        for i, f in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
            if frame_ms is not None:
                frame.pts, frame.time_base = t, fractions.Fraction(1, 1000)
                t += frame_ms[i % len(frame_ms)]
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def make_video_folder(root: Path, per_class: int = 4) -> Path:
    """A labelled folder: 'left' and 'right' (the square's direction), mp4 and avi, 12 frames of 32 x 48."""
    for label, sign in (("left", -1), ("right", 1)):
        (root / label).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            x = pattern(12, 32, 48)
            if sign < 0:
                x = x[:, :, ::-1]
            write_video(root / label / f"{k}.{'mp4' if k % 2 else 'avi'}", x)
    return root


def _write_in_subprocess(path: Path, frames: np.ndarray, fps: int, gop: int, frame_ms) -> Path:
    with tempfile.NamedTemporaryFile(suffix=".npy") as f:
        np.save(f.name, frames)
        code = (f"import sys, numpy as np; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                f"from video_files import write_video; "
                f"write_video({str(path)!r}, np.load({f.name!r}), {fps}, {gop}, {frame_ms!r})")
        subprocess.run([sys.executable, "-c", code], check=True)
    return path
