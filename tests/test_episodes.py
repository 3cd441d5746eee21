"""Episodes (observations with an action per step): the folder format, shards of it, and `multijepa record`
from a real Gymnasium MuJoCo environment rendered headless."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from multijepa.cli import main
from multijepa.episodes import CAMERAS, iter_episodes, read_episode, record, write_episode, write_episode_shards
from multijepa.errors import DataError, DecodeError, MissingExtraError, MultijepaError


def _episode(t: int = 5, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return dict(actions=rng.uniform(-1, 1, (t, 2)).astype(np.float32),
                frames=rng.integers(0, 256, (t + 1, 8, 8, 3), dtype=np.uint8),
                state=rng.normal(size=(t + 1, 4)).astype(np.float32), rewards=rng.normal(size=t).astype(np.float32),
                points=rng.normal(size=(t + 1, 10, 3)).astype(np.float32))


@pytest.mark.parametrize("frames_as", ["png", "npy"])
def test_write_episode__reads_back_exactly(tmp_path, frames_as):
    parts = _episode()
    folder = write_episode(tmp_path / "ep", **parts, meta={"env": "test"}, frames_as=frames_as)
    ep = read_episode(folder)
    assert ep.steps == 5 and ep.meta["env"] == "test" and ep.meta["format"] == "multijepa-episode-v1"
    for key, value in parts.items():
        assert torch.equal(getattr(ep, key), torch.from_numpy(value)), key
    assert (folder / "frames").is_dir() == (frames_as == "png")
    with pytest.raises(MultijepaError, match="exists"):
        write_episode(folder, **parts)


def test_episode__frames_as_a_video_file(tmp_path):
    """frames.mp4 (written here, or by any encoder: PyAV below, as ffmpeg would) decodes to T + 1 frames."""
    av = pytest.importorskip("av")
    parts = _episode(t=7)
    frames = np.zeros((8, 32, 48, 3), np.uint8)  # smooth content, which a video codec keeps closely
    for i in range(8):
        frames[i, 4 + 2 * i:14 + 2 * i, 6:30] = (220, 60, 120)
    parts["frames"] = frames
    ep = read_episode(write_episode(tmp_path / "ep", **parts, frames_as="mp4"))
    assert (tmp_path / "ep/frames.mp4").is_file() and not (tmp_path / "ep/frames").exists()
    assert ep.frames.shape == (8, 32, 48, 3) and ep.frames.dtype == torch.uint8
    assert (ep.frames.float() - torch.from_numpy(frames).float()).abs().mean() < 3  # near-lossless
    assert torch.equal(ep.state, torch.from_numpy(parts["state"]))
    (shard,) = write_episode_shards(tmp_path / "ep", tmp_path / "shards")
    assert torch.equal(next(iter_episodes(shard)).frames, ep.frames)
    # a video made elsewhere, one frame short of the actions: named
    folder = tmp_path / "other"
    folder.mkdir()
    np.save(folder / "actions.npy", parts["actions"])
    (folder / "episode.json").write_text(json.dumps({"format": "multijepa-episode-v1", "steps": 7}))
    with av.open(str(folder / "frames.mkv"), "w") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        for frame in frames[:7]:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())
    with pytest.raises(DecodeError, match="frames has 7 entries for 7 actions"):
        read_episode(folder)
    (folder / "frames.mkv").write_bytes(b"not a video")
    with pytest.raises(DecodeError, match="frames.mkv"):
        read_episode(folder)
    with pytest.raises(MultijepaError, match="even frame sides"):
        write_episode(tmp_path / "odd", **{**parts, "frames": frames[:, :31]}, frames_as="mp4")
    with pytest.raises(MultijepaError, match="frames_as='gif'"):
        write_episode(tmp_path / "gif", **parts, frames_as="gif")


def test_episode_shards__hold_the_same_episodes(tmp_path):
    for i in range(3):
        write_episode(tmp_path / "eps" / f"ep_{i}", **_episode(4 + i, seed=i))
    shards = write_episode_shards(tmp_path / "eps", tmp_path / "shards", per_shard=2)
    assert [p.name for p in shards] == ["episodes-000000.tar", "episodes-000001.tar"]
    folders, packed = list(iter_episodes(tmp_path / "eps")), list(iter_episodes(tmp_path / "shards"))
    assert [e.steps for e in packed] == [4, 5, 6]
    assert all(torch.equal(a.frames, b.frames) and torch.equal(a.state, b.state) and torch.equal(a.points, b.points)
               for a, b in zip(folders, packed))


def test_episode__bad_episodes_are_named(tmp_path):
    parts = _episode()
    with pytest.raises(DecodeError, match="frames has 5 entries for 5 actions"):
        write_episode(tmp_path / "a", **{**parts, "frames": parts["frames"][:5]})
    with pytest.raises(DecodeError, match="no observations"):
        write_episode(tmp_path / "b", actions=parts["actions"])
    with pytest.raises(DecodeError, match=r"points must be \[steps \+ 1, P, 3 \+ F\] \(xyz first\), got \[6, 10, 2\]"):
        write_episode(tmp_path / "b", **{**parts, "points": parts["points"][..., :2]})
    with pytest.raises(DecodeError, match="points holds NaN"):
        write_episode(tmp_path / "b", **{**parts, "points": parts["points"] * np.nan})
    folder = write_episode(tmp_path / "c", **parts)
    (folder / "actions.npy").write_bytes(b"junk")
    with pytest.raises(DecodeError, match="actions.npy: not a readable .npy"):
        read_episode(folder)
    (folder / "episode.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(DecodeError, match="expected 'multijepa-episode-v1'"):
        read_episode(folder)
    with pytest.raises(DataError, match="no episodes"):
        list(iter_episodes(tmp_path / "a"))


def test_record__reacher_pixels_and_state_headless(tmp_path):
    written = record("Reacher-v5", tmp_path / "eps", episodes=2, steps=6, size=32, policy="smooth", seed=3)
    eps = [read_episode(p) for p in written]
    assert [e.steps for e in eps] == [6, 6]
    assert eps[0].frames.shape == (7, 32, 32, 3) and eps[0].state.shape == (7, 10) and eps[0].actions.shape == (6, 2)
    assert eps[0].frames.float().std() > 1 and not torch.equal(eps[0].frames[0], eps[0].frames[-1])  # it moved
    # proprio: the arm's joints (cos, sin, velocity), which Reacher's observation holds in columns 0-3 and 6-7
    assert torch.allclose(eps[0].proprio, eps[0].state[:, [0, 1, 2, 3, 6, 7]], atol=1e-6)
    assert eps[0].meta == {"format": "multijepa-episode-v1", "steps": 6, "env": "Reacher-v5", "policy": "smooth",
                           "seed": 3, "size": 32, "camera": CAMERAS["Reacher-v5"], "action_repeat": 1}  # top-down
    again = record("Reacher-v5", tmp_path / "again", episodes=1, steps=6, size=32, policy="smooth", seed=3)
    assert torch.equal(read_episode(again[0]).frames, eps[0].frames)  # seeded: the same episode
    own = read_episode(record("Reacher-v5", tmp_path / "own", episodes=1, steps=6, size=32, policy="smooth", seed=3,
                              camera="env")[0])
    assert own.meta["camera"] is None and torch.equal(own.state, eps[0].state)  # the same run, another view:
    assert (own.frames.float() - eps[0].frames.float()).abs().mean() > 20       # the arena from afar
    with pytest.raises(MultijepaError, match="camera 'top'"):
        record("Reacher-v5", tmp_path / "bad", episodes=1, steps=1, camera="top")


def test_record__then_torch_compile_in_one_process(tmp_path):
    """Rendering made an EGL context; Triton, loaded after it, used to segfault the process (a fresh one here)."""
    code = (f"from multijepa.episodes import record; record('Reacher-v5', {str(tmp_path / 'e')!r}, episodes=1, "
            f"steps=1, size=16); import torch._dynamo; print('fine')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "fine" in done.stdout, done.stderr[-2000:]


def test_record__action_repeat_applies_each_action_for_r_steps(tmp_path):
    push = lambda obs, rng: np.array([0.5, -0.3], np.float32)  # the same action at every step
    coarse = read_episode(record("Reacher-v5", tmp_path / "r2", episodes=1, steps=3, pixels=False, policy=push,
                                 action_repeat=2)[0])
    fine = read_episode(record("Reacher-v5", tmp_path / "r1", episodes=1, steps=6, pixels=False, policy=push)[0])
    assert coarse.steps == 3 and coarse.meta["action_repeat"] == 2 and fine.meta["action_repeat"] == 1
    assert torch.allclose(coarse.state, fine.state[::2])  # observation k: after 2k environment steps
    assert torch.allclose(coarse.rewards, fine.rewards.reshape(3, 2).sum(1))  # the repeated steps' rewards, summed
    with pytest.raises(MultijepaError, match="action_repeat must be at least 1"):
        record("Reacher-v5", tmp_path / "bad", episodes=1, steps=1, action_repeat=0)


def test_record__the_cli_state_only_and_its_errors(tmp_path, capsys):
    assert main(["record", "Reacher-v5", str(tmp_path / "s"), "--episodes", "1", "--steps", "3",
                 "--observations", "state"]) == 0
    ep = read_episode(tmp_path / "s" / "ep_000000")
    assert ep.frames is None and ep.state.shape == (4, 10)
    assert main(["record", "Reacher-v5", str(tmp_path / "p"), "--episodes", "1", "--steps", "3", "--size", "16",
                 "--observations", "pixels"]) == 0
    ep = read_episode(tmp_path / "p" / "ep_000000")
    assert ep.state is None and ep.frames.shape == (4, 16, 16, 3)
    assert main(["record", "NoSuchEnv-v0", str(tmp_path / "x")]) == 2
    assert "cannot make the Gymnasium environment 'NoSuchEnv-v0'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["record", "Reacher-v5", str(tmp_path / "y"), "--observations", "pixel"])


def test_record__without_gymnasium_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gymnasium", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'multijepa\[worldmodel\]'"):
        record("Reacher-v5", tmp_path / "eps")
