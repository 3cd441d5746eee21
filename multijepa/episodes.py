"""Episodes: observations with an action per step, the data of world models; ``multijepa record``.

An episode of ``T`` steps is a folder (or one sample of a webdataset shard) holding::

    episode.json   {"format": "multijepa-episode-v1", "steps": T, "env": ..., "policy": ..., "seed": ...,
                    "camera": the MuJoCo view frames were rendered from, null for the environment's own,
                    "action_repeat": environment steps each recorded action was held for}
    actions.npy    float32 [T, A]: the action taken at step t, after observation t
    frames/        T + 1 images (000000.png, ...; any image type multijepa reads), observation t = file t;
                   or frames.npy, uint8 [T + 1, H, W, C] (what shards hold: one member instead of T + 1);
                   or frames.mp4 (any video type multijepa reads), T + 1 frames, decoded as RGB
    state.npy      float32 [T + 1, D]: state-vector observations (a time series of D channels)
    points.npy     float32 [T + 1, P, 3 + F]: point-cloud observations, P points a step (xyz, then the
                   features a point-cloud encoder keeps: normals, colours)
    audio.wav      optional, any audio type multijepa reads: the sound over the episode, cut into T + 1
                   equal slots, one per observation (a world model hears the window ending with slot t)
    proprio.npy    float32 [T + 1, P], optional: proprioceptive state (the robot's joints; ``record`` writes
                   what :data:`PROPRIO` says for a MuJoCo environment)
    rewards.npy    float32 [T], optional

At least one of frames, state, points and audio is present. Observation t is what was seen before action t;
observation T is what the last action led to.

>>> ep = read_episode("episodes/ep_000000")  # doctest: +SKIP
>>> ep.frames.shape, ep.actions.shape  # doctest: +SKIP
(torch.Size([51, 64, 64, 3]), torch.Size([50, 2]))
>>> record("Reacher-v5", "episodes", episodes=20, steps=50)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import numpy as np
import torch

from multijepa.errors import DataError, DecodeError, MultijepaError, require
from multijepa.readers import AUDIO_EXTENSIONS, IMAGE_EXTENSIONS, _decode_audio, read_image
from multijepa.readers.video import VIDEO_EXTENSIONS, write_video

FORMAT = "multijepa-episode-v1"
META = "episode.json"
ARRAYS = ("actions", "state", "points", "proprio", "rewards", "frames")  # the .npy members an episode may hold


@dataclass
class Episode:
    """One episode: ``actions`` [T, A]; ``frames`` uint8 [T + 1, H, W, C], ``state`` [T + 1, D], ``points``
    [T + 1, P, 3 + F] and/or ``audio`` float [C, S] at ``audio_rate`` Hz; optional ``proprio`` [T + 1, P] and
    ``rewards`` [T]; ``meta`` from episode.json."""

    actions: torch.Tensor
    frames: Optional[torch.Tensor] = None
    state: Optional[torch.Tensor] = None
    proprio: Optional[torch.Tensor] = None
    rewards: Optional[torch.Tensor] = None
    meta: dict = field(default_factory=dict)
    name: str = ""
    audio: Optional[torch.Tensor] = None
    audio_rate: int = 0
    points: Optional[torch.Tensor] = None

    @property
    def steps(self) -> int:
        return len(self.actions)


def _check(ep: Episode) -> Episode:
    """Shapes as the format says, or a DecodeError naming the episode and the member."""
    t = ep.steps
    if ep.actions.ndim != 2 or t == 0:
        raise DecodeError(f"{ep.name}: actions must be [steps, action_dim] with at least one step, got "
                          f"{list(ep.actions.shape)}")
    if ep.frames is None and ep.state is None and ep.points is None and ep.audio is None:
        raise DecodeError(f"{ep.name}: no observations (frames/, frames.npy, a frames video, state.npy, points.npy "
                          f"or an audio file); record them with the episode")
    if ep.audio is not None and (ep.audio.ndim != 2 or ep.audio.shape[1] < t + 1 or ep.audio_rate < 1):
        raise DecodeError(f"{ep.name}: audio must be [channels, samples] with at least one sample per observation "
                          f"({t + 1}) and a sample rate, got {list(ep.audio.shape)} at {ep.audio_rate} Hz")
    for key, per in (("frames", t + 1), ("state", t + 1), ("points", t + 1), ("proprio", t + 1), ("rewards", t)):
        value = getattr(ep, key)
        if value is not None and len(value) != per:
            raise DecodeError(f"{ep.name}: {key} has {len(value)} entries for {t} actions; an episode of T steps "
                              f"holds T + 1 observations and T rewards")
    if ep.frames is not None and (ep.frames.ndim != 4 or ep.frames.dtype != torch.uint8):
        raise DecodeError(f"{ep.name}: frames must be uint8 [steps + 1, H, W, C], got {ep.frames.dtype} "
                          f"{list(ep.frames.shape)}")
    if ep.points is not None and (ep.points.ndim != 3 or ep.points.shape[1] < 1 or ep.points.shape[2] < 3):
        raise DecodeError(f"{ep.name}: points must be [steps + 1, P, 3 + F] (xyz first), got {list(ep.points.shape)}")
    for key in ("state", "points", "proprio", "actions", "audio"):
        value = getattr(ep, key)
        if value is not None and not torch.isfinite(value).all():
            raise DecodeError(f"{ep.name}: {key} holds NaN or infinite values")
    return ep


def _array(data: bytes, name: str) -> torch.Tensor:
    try:
        value = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # numpy raises ValueError, OSError, EOFError for a bad file
        raise DecodeError(f"{name}: not a readable .npy array ({type(e).__name__}: {e})") from None
    return torch.from_numpy(np.ascontiguousarray(value if value.dtype == np.uint8 else value.astype(np.float32)))


def _from_members(members: dict[str, bytes], name: str, frames: Optional[torch.Tensor] = None) -> Episode:
    """An episode from its members' bytes: ``episode.json`` and ``<key>.npy`` (a shard sample, or a folder's
    files), with ``frames`` read from a folder's frames/ where it has no frames.npy."""
    if META not in members:
        raise DecodeError(f"{name}: no {META}; is this an episode (written by multijepa record or write_episode)?")
    try:
        meta = json.loads(members[META])
    except ValueError as e:
        raise DecodeError(f"{name}/{META}: not valid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise DecodeError(f"{name}/{META}: format {meta.get('format')!r}, expected {FORMAT!r}")
    if "actions.npy" not in members:
        raise DecodeError(f"{name}: no actions.npy; every episode holds its actions")
    arrays = {key: _array(members[f"{key}.npy"], f"{name}/{key}.npy") for key in ARRAYS if f"{key}.npy" in members}
    videos = [m for m in members if m.startswith("frames.") and "." + m.partition(".")[2].lower() in VIDEO_EXTENSIONS]
    if frames is None and "frames" not in arrays and videos:
        frames = _video_frames(members[videos[0]], f"{name}/{videos[0]}")
    arrays.setdefault("frames", frames)
    sounds = [m for m in members if m.startswith("audio.") and "." + m.partition(".")[2].lower() in AUDIO_EXTENSIONS]
    if sounds:
        samples, arrays["audio_rate"] = _decode_audio(members[sounds[0]], f"{name}/{sounds[0]}")
        arrays["audio"] = torch.from_numpy(np.ascontiguousarray(samples.T, dtype=np.float32))
    return _check(Episode(meta=meta, name=name, **arrays))


def _video_frames(data: bytes, name: str) -> torch.Tensor:
    """Every frame of an encoded video, uint8 [T, H, W, 3] (DecodeError names a bad file)."""
    from multijepa.readers.video import open_video

    with open_video(data, name) as video:
        return torch.from_numpy(np.ascontiguousarray(video.read(list(range(video.num_frames)))))


def read_episode(path: Union[str, Path]) -> Episode:
    """Read an episode folder (see the module's docstring), checking it; DecodeError names what is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise DecodeError(f"{path}: not an episode folder")
    members = {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}
    frames = None
    if "frames.npy" not in members and (path / "frames").is_dir():
        files = sorted(p for p in (path / "frames").iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if files:
            frames = torch.stack([read_image(p).permute(1, 2, 0) for p in files])
    return _from_members(members, str(path), frames)


def find_episodes(root: Union[str, Path]) -> list[Path]:
    """Episode folders (holding episode.json) under ``root``, sorted; shards (``*.tar``) are read by :func:`iter_episodes`."""
    root = Path(root)
    if (root / META).is_file():
        return [root]
    return sorted(p.parent for p in root.rglob(META))


def iter_episodes(root: Union[str, Path]) -> Iterator[Episode]:
    """Every episode of a folder of episode folders, or of webdataset shards (a ``.tar`` or a folder of them)."""
    root = Path(root)
    shards = [root] if root.suffix == ".tar" else sorted(root.glob("*.tar")) if root.is_dir() else []
    folders = find_episodes(root) if root.is_dir() else []
    if not shards and not folders:
        raise DataError(f"{root}: no episodes (folders with {META}, or .tar shards of them); record some with "
                        f"multijepa record ENV_ID {root}")
    for folder in folders:
        yield read_episode(folder)
    for shard in shards:
        samples: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.isfile():
                    key, _, ext = member.name.partition(".")
                    samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for key, members in samples.items():
            yield _from_members(members, f"{shard}:{key}")


def write_episode(out: Union[str, Path], actions, frames=None, state=None, proprio=None, rewards=None,
                  meta: Optional[dict] = None, frames_as: str = "png", audio=None, audio_rate: int = 0,
                  points=None) -> Path:
    """Write one episode folder atomically (a temporary folder renamed into place).

    Args:
        out: the episode folder to create (it must not exist).
        actions: [T, A]; frames: uint8 [T + 1, H, W, C]; state: [T + 1, D]; points: [T + 1, P, 3 + F];
            proprio: [T + 1, P]; rewards: [T] (arrays or tensors; see the module's docstring).
        meta: more entries for episode.json (env, policy, seed ...).
        audio: float [C, S] (or [S]) in [-1, 1] at ``audio_rate`` Hz, the sound over the episode: audio.wav
            (32-bit float, lossless).
        frames_as: ``png`` (a frames/ folder of images), ``npy`` (one frames.npy) or ``mp4`` (one H.264
            frames.mp4, near-lossless: compact for long episodes; gray frames come back as RGB).
    """
    out = Path(out)
    if out.exists():
        raise MultijepaError(f"{out}: exists; episodes are not overwritten (give another folder)")
    if frames_as not in ("png", "npy", "mp4"):
        raise MultijepaError(f"write_episode: frames_as={frames_as!r}: use png, npy or mp4")
    arrays = {k: None if v is None else torch.as_tensor(np.asarray(v)) for k, v in
              dict(actions=actions, frames=frames, state=state, points=points, proprio=proprio,
                   rewards=rewards).items()}
    for key in ("actions", "state", "points", "proprio", "rewards"):
        if arrays[key] is not None:
            arrays[key] = arrays[key].float()
    if audio is not None:
        audio = torch.as_tensor(np.asarray(audio)).float()
        audio = audio[None] if audio.ndim == 1 else audio
    episode = _check(Episode(meta={}, name=str(out), audio=audio, audio_rate=audio_rate, **arrays))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / META).write_text(json.dumps({"format": FORMAT, "steps": episode.steps, **(meta or {})}) + "\n")
        for key in ARRAYS:
            value = getattr(episode, key)
            if value is None or (key == "frames" and frames_as != "npy"):
                continue
            np.save(tmp / f"{key}.npy", value.numpy())
        if episode.frames is not None and frames_as == "mp4":
            write_video(tmp / "frames.mp4", episode.frames.numpy())
        if episode.audio is not None:
            import soundfile

            soundfile.write(tmp / "audio.wav", episode.audio.T.numpy(), episode.audio_rate, subtype="FLOAT")
        if episode.frames is not None and frames_as == "png":
            from PIL import Image

            (tmp / "frames").mkdir()
            for i, frame in enumerate(episode.frames.numpy()):
                Image.fromarray(frame.squeeze(-1) if frame.shape[-1] == 1 else frame).save(tmp / "frames" / f"{i:06d}.png")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_episode_shards(src: Union[str, Path], out_dir: Union[str, Path], per_shard: int = 100) -> list[Path]:
    """Pack the episode folders under ``src`` into webdataset shards (one sample per episode, frames as
    one ``frames.npy``), each written under a temporary name and renamed."""
    folders = find_episodes(src)
    if not folders:
        raise DataError(f"{src}: no episode folders (with {META}) to pack")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for start in range(0, len(folders), per_shard):
        name = out_dir / f"episodes-{start // per_shard:06d}.tar"
        tmp = name.with_suffix(".tar.tmp")
        with tarfile.open(tmp, "w") as tar:
            for k, folder in enumerate(folders[start:start + per_shard], start):
                episode = read_episode(folder)
                members = {META: (folder / META).read_bytes()}
                members.update({p.name: p.read_bytes() for p in folder.glob("audio.*")
                                if p.suffix.lower() in AUDIO_EXTENSIONS})  # as recorded
                for key in ARRAYS:
                    value = getattr(episode, key)
                    if value is not None:
                        buffer = io.BytesIO()
                        np.save(buffer, value.numpy())
                        members[f"{key}.npy"] = buffer.getvalue()
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{k:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        os.replace(tmp, name)
        written.append(name)
    return written


def state_series(root: Union[str, Path]) -> np.ndarray:
    """Every episode's states as one array of series, float32 [episodes, D, longest T + 1], shorter episodes
    padded with NaN at the end: ``np.save("states.npy", state_series("episodes/"))`` is a time-series data
    set that ``multijepa pretrain recipes/timeseries.yaml data.path=states.npy`` trains a state encoder on."""
    states = [ep.state for ep in iter_episodes(root) if ep.state is not None]
    if not states:
        raise DataError(f"{root}: no episode holds state.npy; record with --observations state")
    if len({s.shape[1] for s in states}) > 1:
        raise DataError(f"{root}: episodes with different state sizes; one series set needs one")
    out = np.full((len(states), states[0].shape[1], max(len(s) for s in states)), np.nan, dtype=np.float32)
    for i, s in enumerate(states):
        out[i, :, :len(s)] = s.T.numpy()
    return out


Policy = Callable[[np.ndarray, "np.random.Generator"], np.ndarray]

# Views that show what a task is about: Reacher-v5's own camera looks at the whole arena from afar (the arm
# is a few pixels of a 64 x 64 frame); this one looks straight down on the arm's reach (docs/world-models.md).
CAMERAS = {"Reacher-v5": {"distance": 0.65, "elevation": -90.0, "azimuth": 90.0, "lookat": [0.0, 0.0, 0.0]}}


def _reacher_proprio(data) -> np.ndarray:
    q = data.qpos[:2]  # the arm's two joints (qpos[2:] is the target's position)
    return np.concatenate([np.cos(q), np.sin(q), data.qvel[:2]])


# The proprioceptive state ``record`` writes (proprio.npy) for a known task: the robot's own joints, what a
# world model may be told beside its frames (V-JEPA 2-AC gives its predictor the arm's state). Any other
# MuJoCo environment gets its joint positions and velocities (qpos, qvel) whole; others none.
PROPRIO: dict[str, Callable] = {"Reacher-v5": _reacher_proprio}


def proprio_of(env, env_id: str) -> Optional[np.ndarray]:
    """The proprioceptive state of ``env`` now, float32 [P], as :data:`PROPRIO` defines it (None: not MuJoCo)."""
    data = getattr(env.unwrapped, "data", None)
    if data is None or not hasattr(data, "qpos"):
        return None
    fn = PROPRIO.get(env_id)
    return np.asarray(fn(data) if fn else np.concatenate([data.qpos, data.qvel]), dtype=np.float32).reshape(-1)


def make_env(env_id: str, pixels: bool, size: int, camera: Optional[dict], what: str,
             max_episode_steps: Optional[int] = None):
    """A Gymnasium environment rendering ``size`` x ``size`` frames (where ``pixels``) from ``camera`` (a MuJoCo
    ``default_camera_config``; None: the environment's own view), or a MultijepaError that says what to do.
    ``max_episode_steps`` replaces the environment's own time limit."""
    os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering, before MuJoCo is imported
    if pixels and importlib.util.find_spec("triton") is not None:
        # Triton (which torch.compile and fused optimisers import) segfaults when it loads after MuJoCo has made
        # an EGL context in the process (their LLVMs clash); loaded first, both work.
        importlib.import_module("triton")
    gym = require("gymnasium", what)
    kwargs = {"render_mode": "rgb_array", "width": size, "height": size} if pixels else {}
    if max_episode_steps:
        kwargs["max_episode_steps"] = max_episode_steps
    if pixels and camera:
        kwargs["default_camera_config"] = {k: np.asarray(v, dtype=np.float64) if isinstance(v, (list, tuple)) else v
                                           for k, v in camera.items()}
    try:
        return gym.make(env_id, **kwargs)
    except Exception as e:  # an unknown id, a missing simulator, a kwargs mismatch
        raise MultijepaError(f"{what}: cannot make the Gymnasium environment {env_id!r} ({type(e).__name__}: {e}); "
                             f"check the id (gymnasium.pprint_registry() lists them) and that its simulator is "
                             f"installed (MuJoCo: pip install 'multijepa[worldmodel]')") from None


def smooth_random(action_space, rng: np.random.Generator, keep: float = 0.8) -> Policy:
    """Random actions that drift (each ``keep`` times the last plus fresh noise, clipped to the box):
    trajectories that travel further than independent draws."""
    low, high = np.asarray(action_space.low, dtype=np.float64), np.asarray(action_space.high, dtype=np.float64)
    last = [np.zeros_like(low)]

    def act(obs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        fresh = rng.uniform(low, high)
        last[0] = np.clip(keep * last[0] + (1 - keep) * fresh * 2.0, low, high)
        return last[0].astype(np.float32)

    return act


def record(env_id: str, out: Union[str, Path], episodes: int = 10, steps: int = 50, pixels: bool = True,
           state: bool = True, size: int = 64, policy: Union[str, Policy] = "random", seed: int = 0,
           camera: Union[str, dict, None] = "auto", frames_as: str = "png", action_repeat: int = 1,
           progress: bool = False) -> list[Path]:
    """Write ``episodes`` episodes of a Gymnasium environment into ``out/ep_NNNNNN`` (``multijepa record``).

    Args:
        env_id: a Gymnasium id, e.g. ``Reacher-v5`` (MuJoCo; rendered headless through EGL).
        pixels / state: record rendered frames (``size`` x ``size``) and/or the environment's observation vector.
        steps: the most steps per episode (one ends earlier when the environment terminates or truncates it).
        policy: ``random`` (uniform in the action box), ``smooth`` (:func:`smooth_random`), or a callable
            ``(observation, rng) -> action``.
        seed: seeds the environment's resets and the policy; episode i resets with ``seed + i``.
        camera: ``auto`` (the view of :data:`CAMERAS` for a known task, else the environment's own), ``env``
            (the environment's own) or a MuJoCo ``default_camera_config`` dict; kept in episode.json, so that a
            world model trained on the frames plans from the same view.
        frames_as: how frames are stored, as :func:`write_episode` takes it (``png``, ``npy`` or ``mp4``).
        action_repeat: each recorded action is applied for this many environment steps (its rewards summed)
            and the next observation is the one after them: a coarser time step, over which an action moves
            things further (the usual setting for planning from pixels). Kept in episode.json.
    """
    if not (pixels or state):
        raise MultijepaError("record: ask for pixels, state or both")
    if episodes < 1 or steps < 1 or size < 8 or action_repeat < 1:
        raise MultijepaError(f"record: episodes, steps and action_repeat must be at least 1 and size at least 8 "
                             f"(got {episodes}, {steps}, {action_repeat}, {size})")
    from tqdm.auto import tqdm

    if camera in ("auto", "env"):
        camera = CAMERAS.get(env_id) if camera == "auto" else None
    elif camera is not None and not isinstance(camera, dict):
        raise MultijepaError(f"record: camera {camera!r}: use auto, env or a MuJoCo default_camera_config dict")
    camera = camera if pixels else None
    env = make_env(env_id, pixels, size, camera, "record", max_episode_steps=steps * action_repeat)
    rng = np.random.default_rng(seed)
    env.action_space.seed(seed)
    out = Path(out)
    written = []
    for i in tqdm(range(episodes), disable=not progress, desc="record", unit="episode", leave=False):
        act = (smooth_random(env.action_space, rng) if policy == "smooth" else
               (lambda obs, rng: env.action_space.sample()) if policy == "random" else policy)
        if not callable(act):
            raise MultijepaError(f"record: policy {policy!r}: use random, smooth or a callable (observation, rng) -> action")
        obs, _ = env.reset(seed=seed + i)
        frames, states, actions, rewards, proprio = [], [], [], [], []

        def observe():
            states.append(np.asarray(obs, dtype=np.float32).reshape(-1))
            proprio.append(proprio_of(env, env_id))
            if pixels:
                frames.append(np.asarray(env.render(), dtype=np.uint8))

        for _ in range(steps + 1):
            observe()
            if len(actions) == steps:
                break
            action = np.asarray(act(obs, rng), dtype=np.float32)
            reward = 0.0
            for _ in range(action_repeat):
                obs, r, terminated, truncated, _ = env.step(action)
                reward += float(r)
                if terminated or truncated:
                    break
            actions.append(action.reshape(-1))
            rewards.append(reward)
            if terminated or truncated:
                observe()
                break
        written.append(write_episode(out / f"ep_{i:06d}", np.stack(actions), np.stack(frames) if pixels else None,
                                     np.stack(states) if state else None,
                                     None if proprio[0] is None else np.stack(proprio),
                                     rewards=np.asarray(rewards, np.float32),
                                     meta={"env": env_id, "policy": policy if isinstance(policy, str) else "custom",
                                           "seed": seed + i, "size": size if pixels else None, "camera": camera,
                                           "action_repeat": action_repeat},
                                     frames_as=frames_as))
    env.close()
    return written
