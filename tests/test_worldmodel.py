"""World models: the block-causal action-conditioned predictor, rollouts, the planners, training through
`multijepa pretrain` (resume included), and `multijepa plan` in a real MuJoCo environment."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY, TINY_AUDIO, TINY_IMAGE
from multijepa.cli import main
from multijepa.episodes import CAMERAS, read_episode, state_series, write_episode
from multijepa.errors import DataError, MultijepaError, RecipeError, TrainingError
from multijepa.worldmodel import (ActionPredictor, WorldModel, WorldModelConfig, block_causal_mask, cem,
                                  evaluate_planning, load_worldmodel_recipe, mppi, rollout_latents,
                                  train_world_model)
from multijepa.worldmodel.plan import ReacherGoals
from multijepa.worldmodel.train import clip_losses

TINY_WM = ["worldmodel.dim=32", "worldmodel.depth=1", "worldmodel.heads=2", "worldmodel.window=4",
           "worldmodel.rollout_steps=2", "worldmodel.pool=2", "data.batch_size=8", "train.progress=false",
           "train.log_every=2", "train.checkpoint_every=2", "optim.warmup_steps=2", "train.precision=fp32"]

TINY_VIDEO = TINY + ["video.frames=4", "video.frame_stride=2", "video.size=32", "video.patch_size=8",
                     "mask.min_context=2"]
TINY_POINTS = TINY + ["pointcloud.num_points=128", "pointcloud.num_groups=16", "pointcloud.group_size=8",
                      "pointcloud.pointnet_width=16", "mask.min_context=2"]


def _dot_episodes(root, episodes: int = 6, steps: int = 8, size: int = 16, seed: int = 0,
                  frames_as: str = "png") -> None:
    """A dot that each action moves by up to 2 px: frames uint8 [T + 1, size, size, 3], state = its position."""
    rng = np.random.default_rng(seed)
    for e in range(episodes):
        pos = rng.uniform(4, size - 4, 2)
        frames, states, actions = [], [], []
        for t in range(steps + 1):
            frame = np.zeros((size, size, 3), np.uint8)
            r, c = np.clip(pos.round().astype(int), 1, size - 2)
            frame[r - 1:r + 2, c - 1:c + 2] = 255
            frames.append(frame)
            states.append(np.concatenate([pos / size, [1.0]]).astype(np.float32))
            if t < steps:
                a = rng.uniform(-1, 1, 2).astype(np.float32)
                actions.append(a)
                pos = np.clip(pos + 2 * a, 2, size - 3)
        write_episode(root / f"ep_{e:03d}", np.stack(actions), np.stack(frames), np.stack(states), frames_as=frames_as)


def _train(*overrides: str):
    return train_world_model(load_worldmodel_recipe(ROOT / "recipes/worldmodel.yaml", list(overrides)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Dot episodes, a tiny image encoder pretrained on their frames, and a world model trained on it."""
    root = tmp_path_factory.mktemp("wm")
    _dot_episodes(root / "eps")
    main(["pretrain", str(ROOT / "recipes/frames.yaml"), *TINY_IMAGE, f"data.path={root / 'eps'}", "train.steps=2",
          f"run.dir={root / 'enc'}"])
    main(["pretrain", str(ROOT / "recipes/worldmodel.yaml"), *TINY_WM, f"worldmodel.encoder={root / 'enc/last.pt'}",
          f"data.path={root / 'eps'}", "train.steps=4", f"run.dir={root / 'wm'}"])
    return root


def test_block_causal_mask__a_step_never_sees_a_later_step():
    torch.manual_seed(0)
    cfg = WorldModelConfig(dim=32, depth=2, heads=2)
    predictor = ActionPredictor(8, 3, 2, 1, cfg).eval()
    torch.nn.init.normal_(predictor.out.weight, std=0.1)  # residual predictors start as copies: make it attend
    z, a, p = torch.randn(2, 5, 3, 8), torch.randn(2, 5, 2), torch.randn(2, 5, 1)
    out, p_out = predictor(z, a, p)
    assert out.shape == (2, 5, 3, 8) and p_out.shape == (2, 5, 1)
    for k in range(5):  # change step k's observation, action and proprio: steps before k are untouched
        z2, a2, p2 = z.clone(), a.clone(), p.clone()
        z2[:, k] += 1.0
        a2[:, k] += 1.0
        p2[:, k] += 1.0
        out2, p_out2 = predictor(z2, a2, p2)
        assert torch.equal(out2[:, :k], out[:, :k]) and torch.equal(p_out2[:, :k], p_out[:, :k]), k
        assert not torch.allclose(out2[:, k:], out[:, k:])
        assert not torch.allclose(out2[:, k + 1:], out[:, k + 1:]) or k == 4  # later steps do see step k
    mask = block_causal_mask(3, 2)
    assert mask.sum().item() == 2 * 2 + 4 * 2 + 6 * 2 and not mask[0, 2] and mask[5, 0]


def test_rollout__shapes_and_teacher_forcing_agree_on_the_first_step():
    torch.manual_seed(0)
    predictor = ActionPredictor(8, 4, 2, 0, WorldModelConfig(dim=16, depth=1, heads=2)).eval()
    z, actions = torch.randn(3, 2, 4, 8), torch.randn(3, 6, 2)  # 2 context steps, 5 predicted
    with torch.no_grad():
        rolled, no_proprio = rollout_latents(predictor, z, actions)
        assert rolled.shape == (3, 5, 4, 8) and no_proprio is None
        assert torch.allclose(rolled[:, 0], predictor(z, actions[:, :2])[0][:, -1], atol=1e-6)
    with pytest.raises(MultijepaError, match="at least one action"):
        rollout_latents(predictor, z, actions[:, :1])
    unconditioned = ActionPredictor(8, 4, 0, 0, WorldModelConfig(dim=16, depth=1, heads=2))  # forecasting: no actions
    assert rollout_latents(unconditioned, z, torch.zeros(3, 4, 0))[0].shape == (3, 3, 4, 8)


def test_rollout__predicts_proprio_and_feeds_it_back():
    torch.manual_seed(0)
    predictor = ActionPredictor(8, 2, 2, 3, WorldModelConfig(dim=16, depth=1, heads=2)).eval()
    for layer in (predictor.out, predictor.proprio_out):  # not the zero-initialised copy-last start
        torch.nn.init.normal_(layer.weight, std=0.1)
    predictor.set_proprio_scale(torch.randn(100, 3) * torch.tensor([1.0, 10.0, 0.1]) + 5)
    z, actions, p = torch.randn(2, 2, 2, 8), torch.randn(2, 4, 2), torch.randn(2, 2, 3)
    with torch.no_grad():
        rolled, p_rolled = rollout_latents(predictor, z, actions, p)
        assert rolled.shape == (2, 3, 2, 8) and p_rolled.shape == (2, 3, 3)
        # the second predicted step is what teacher forcing gives on the first step's own predictions
        z1, p1 = predictor(torch.cat([z, rolled[:, :1]], 1), actions[:, :3], torch.cat([p, p_rolled[:, :1]], 1))
        assert torch.allclose(z1[:, -1], rolled[:, 1], atol=1e-5) and torch.allclose(p1[:, -1], p_rolled[:, 1], atol=1e-5)
    with pytest.raises(MultijepaError, match="reads proprio tokens"):
        predictor(z, actions[:, :2])


@pytest.mark.parametrize("planner", [cem, mppi])
def test_planners__find_the_optimum_of_a_known_energy(planner):
    optimum = torch.tensor([[0.6, -0.3], [0.1, 0.9], [-0.7, 0.2]])
    low, high = -torch.ones(2), torch.ones(2)
    g = torch.Generator().manual_seed(0)
    best, energy = planner(lambda a: ((a - optimum) ** 2).sum((1, 2)), 3, low, high, samples=256, iterations=12,
                           generator=g)
    assert best.shape == (3, 2) and (best - optimum).abs().max() < 0.05 and energy < 0.01
    # an optimum outside the box: the planners stay inside it and end at its edge
    best, _ = planner(lambda a: ((a - 2.0) ** 2).sum((1, 2)), 2, low, high, samples=256, iterations=8, generator=g)
    assert (best <= 1).all() and (best > 0.95).all()


def test_clip_losses__rollouts_start_from_the_first_context_observations():
    torch.manual_seed(0)
    predictor = ActionPredictor(6, 2, 3, 0, WorldModelConfig(dim=16, depth=1, heads=2)).eval()
    torch.nn.init.normal_(predictor.out.weight, std=0.1)  # not the zero-initialised copy-last start
    clip = {"z": torch.randn(2, 9, 2, 6), "actions": torch.randn(2, 8, 3), "proprio": None}
    with torch.no_grad():
        out = clip_losses(predictor, clip, 3, "l1", baseline=True, context=2)
        rolled, _ = rollout_latents(predictor, clip["z"][:, :2], clip["actions"][:, :4])  # 2 seen, 3 predicted
    assert torch.allclose(out["rollout"], (rolled - clip["z"][:, 2:5]).abs().mean())
    assert torch.allclose(out["copy_last"], (clip["z"][:, 1:2] - clip["z"][:, 2:5]).abs().mean())


def test_worldmodel__trains_through_pretrain_logs_and_resumes_exactly(trained, tmp_path):
    lines = [json.loads(x) for x in (trained / "wm/metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 4]
    assert {"loss_teacher", "loss_rollout", "val_rollout", "val_copy_last", "pred_std"} <= set(lines[-1])
    # a run stopped at step 4 (its kept step_0000004.pt as last.pt) and resumed equals 6 steps straight
    args = [str(ROOT / "recipes/worldmodel.yaml"), *TINY_WM, f"worldmodel.encoder={trained / 'enc/last.pt'}",
            f"data.path={trained / 'eps'}", "train.steps=6"]
    main(["pretrain", *args, "train.keep_every=4", f"run.dir={tmp_path / 'straight'}"])
    (tmp_path / "resumed").mkdir()
    shutil.copy(tmp_path / "straight/step_0000004.pt", tmp_path / "resumed/last.pt")
    main(["pretrain", *args, f"run.dir={tmp_path / 'resumed'}"])
    a, b = (torch.load(tmp_path / d / "last.pt", weights_only=True) for d in ("straight", "resumed"))
    assert a["step"] == b["step"] == 6
    assert all(torch.equal(a["predictor"][k], b["predictor"][k]) for k in a["predictor"])
    with pytest.raises(TrainingError, match="other worldmodel settings .*dim"):
        _train(*args[1:], "train.steps=8", "worldmodel.dim=16", f"run.dir={tmp_path / 'resumed'}")


def test_worldmodel__loads_encodes_rolls_out_and_plans(trained):
    wm = WorldModel.load(trained / "wm/last.pt", device="cpu")
    from multijepa.episodes import read_episode

    ep = read_episode(trained / "eps/ep_000")
    z = wm.encode(ep.frames)
    assert z.shape == (9, 4, 32)  # 16 px in 4 px patches: a 4 x 4 grid pooled 2 x 2
    assert wm.rollout(z[None, :2], ep.actions[None, :5]).shape == (1, 4, 4, 32)
    assert torch.allclose(wm.rollout(ep.frames[:2], ep.actions[:5]), wm.rollout(z[None, :2], ep.actions[None, :5])[0])
    plan = wm.plan(ep.frames[:2], ep.frames[-1:], horizon=3, past_actions=ep.actions[:1], samples=16, iterations=2,
                   generator=torch.Generator().manual_seed(0))
    assert plan.shape == (3, 2) and (plan >= wm.action_low).all() and (plan <= wm.action_high).all()
    assert wm.plan(ep.frames[:1], ep.frames[-1:], horizon=2, method="mppi", samples=8, iterations=1).shape == (2, 2)
    with pytest.raises(MultijepaError, match="past actions"):
        wm.plan(ep.frames[:2], ep.frames[-1:], horizon=2)
    with pytest.raises(MultijepaError, match="method 'beam'"):
        wm.plan(ep.frames[:1], ep.frames[-1:], method="beam")


def test_worldmodel__proprio_tokens_train_roll_out_and_plan(trained, tmp_path):
    for ep in sorted((trained / "eps").iterdir()):  # the dot's position as its proprio
        (tmp_path / "eps" / ep.name).mkdir(parents=True)
        for f in ep.iterdir():
            (tmp_path / "eps" / ep.name / f.name).symlink_to(f.resolve(), target_is_directory=f.is_dir())
        np.save(tmp_path / "eps" / ep.name / "proprio.npy", np.load(ep / "state.npy")[:, :2])
    args = [*TINY_WM, f"worldmodel.encoder={trained / 'enc/last.pt'}", "worldmodel.proprio=true", "train.steps=4"]
    with pytest.raises(DataError, match="no proprio.npy"):
        _train(*args, f"data.path={trained / 'eps'}", f"run.dir={tmp_path / 'no'}")
    run = _train(*args, f"data.path={tmp_path / 'eps'}", f"run.dir={tmp_path / 'wm'}")
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"loss_proprio", "val_proprio_rollout"} <= set(lines[-1]) and np.isfinite(lines[-1]["loss_proprio"])
    wm = WorldModel.load(run / "last.pt", device="cpu")
    ep = read_episode(tmp_path / "eps/ep_000")
    assert wm.uses_proprio and torch.allclose(wm.predictor.proprio_std, torch.cat(
        [read_episode(tmp_path / "eps" / f"ep_{i:03d}").proprio for i in range(6)]).std(0), rtol=0.5)
    assert wm.rollout(ep.frames[:2], ep.actions[:5], ep.proprio[:2]).shape == (4, 4, 32)
    plan = wm.plan(ep.frames[:2], ep.frames[-1:], horizon=3, past_actions=ep.actions[:1], proprio=ep.proprio[:2],
                   samples=16, iterations=2)
    assert plan.shape == (3, 2)
    with pytest.raises(MultijepaError, match="reads proprio tokens"):
        wm.plan(ep.frames[:2], ep.frames[-1:], horizon=3, past_actions=ep.actions[:1])


def test_worldmodel__state_observations_through_a_timeseries_encoder(tmp_path):
    _dot_episodes(tmp_path / "eps", episodes=4, steps=6)
    series = state_series(tmp_path / "eps")
    assert series.shape == (4, 3, 7)
    np.save(tmp_path / "states.npy", series)
    main(["pretrain", "timeseries", "model.dim=32", "model.depth=1", "model.heads=2", "model.predictor_dim=16",
          "model.predictor_depth=1", "model.predictor_heads=2", "data.batch_size=4", "train.progress=false",
          "timeseries.length=4", "timeseries.patch_size=1", "timeseries.channel_mode=mixed", "timeseries.channels=3",
          "timeseries.instance_norm=false", "mask.full_span_axes=[]", "mask.min_context=1", "train.steps=2",
          f"data.path={tmp_path / 'states.npy'}", f"run.dir={tmp_path / 'enc'}"])
    main(["pretrain", "worldmodel", *TINY_WM, "worldmodel.observation=state", "worldmodel.pool=0",
          f"worldmodel.encoder={tmp_path / 'enc/last.pt'}", f"data.path={tmp_path / 'eps'}", "train.steps=2",
          f"run.dir={tmp_path / 'wm'}"])
    wm = WorldModel.load(tmp_path / "wm/last.pt", device="cpu")
    from multijepa.episodes import read_episode

    ep = read_episode(tmp_path / "eps/ep_000")
    assert wm.encode(ep.state).shape == (7, 1, 32)
    assert wm.plan(ep.state[:1], ep.state[-1:], horizon=2, samples=8, iterations=1).shape == (2, 2)
    windows = wm.observer.inputs(ep.state)  # per step the 4 latest states, the first repeated before the start
    assert wm.observer.history == 3 and windows.shape == (7, 3, 4)
    assert torch.equal(windows[0], ep.state[0][:, None].expand(3, 4)) and torch.equal(windows[6], ep.state[3:7].T)
    assert wm.plan(ep.state[:5], ep.state[-1:], horizon=2, past_actions=ep.actions[3:4], context=2, samples=8,
                   iterations=1).shape == (2, 2)


@pytest.mark.filterwarnings("ignore:step 1. target representations look collapsed")  # one pretraining step
def test_worldmodel__audio_observations_through_an_audio_encoder(tmp_path):
    """Episodes whose sound is a tone that the actions retune: each step hears its window of the sound."""
    rate, slot, steps = 16000, 0.1, 6  # the file's rate; the encoder resamples to its 8 kHz
    rng = np.random.default_rng(0)
    for e in range(3):
        actions = rng.uniform(-1, 1, (steps, 1)).astype(np.float32)
        pitch = np.repeat(300 * 2 ** np.cumsum(np.concatenate([[0.0], actions[:, 0]]) * 0.5), int(slot * rate))
        write_episode(tmp_path / "eps" / f"ep_{e}", actions, audio=0.5 * np.sin(2 * np.pi * np.cumsum(pitch) / rate),
                      audio_rate=rate)
    ep = read_episode(tmp_path / "eps/ep_0")
    assert ep.audio.shape == (1, 11200) and ep.audio_rate == rate and ep.frames is None
    main(["pretrain", "audio", *TINY_AUDIO, f"data.path={tmp_path / 'eps'}", "train.steps=1", "data.batch_size=3",
          f"run.dir={tmp_path / 'enc'}"])
    main(["pretrain", "worldmodel", *TINY_WM, "worldmodel.observation=audio", "worldmodel.pool=4",
          f"worldmodel.encoder={tmp_path / 'enc/last.pt'}", f"data.path={tmp_path / 'eps'}", "train.steps=2",
          f"run.dir={tmp_path / 'wm'}"])
    wm = WorldModel.load(tmp_path / "wm/last.pt", device="cpu")
    windows = wm.observer.observations(ep)  # T + 1 windows of 0.5 s at 8 kHz, each ending with its step's slot
    assert windows.shape == (7, 1, 4000)
    assert windows[0, 0, :3200].abs().max() == 0 and windows[0, 0, -800:].abs().max() > 0.1  # silence, then slot 0
    assert torch.equal(windows[6, :, :-800], windows[5, :, 800:])  # one slot later
    z = wm.encode(windows)
    assert z.shape == (7, 3, 32)  # a (4, 12) grid pooled in 4 x 4 cells
    assert wm.rollout(windows[:2], ep.actions).shape == (5, 3, 32)
    assert wm.plan(windows[:1], windows[-1:], horizon=2, samples=8, iterations=1).shape == (2, 1)
    with pytest.raises(MultijepaError, match="no goal task for a world model of audio observations"):
        evaluate_planning(wm, "Reacher-v5", episodes=1)
    write_episode(tmp_path / "silent" / "ep", np.zeros((steps, 1)), state=np.zeros((steps + 1, 2)))
    with pytest.raises(DataError, match="has no audio file, which worldmodel.observation=audio reads"):
        _train(*TINY_WM, "worldmodel.observation=audio", f"worldmodel.encoder={tmp_path / 'enc/last.pt'}",
               f"data.path={tmp_path / 'silent'}", f"run.dir={tmp_path / 'wm2'}")


@pytest.mark.filterwarnings("ignore:step 1. target representations look collapsed")  # one pretraining step
def test_worldmodel__frames_through_a_video_encoder_as_clips_ending_at_each_step(tmp_path):
    """A video encoder reads, per step, the clip of its last video.frames frames (every frame_stride-th), the first
    frame repeated before the start; planning hands it that much past before the predictor's context."""
    _dot_episodes(tmp_path / "eps", episodes=3, steps=6, frames_as="mp4")  # the encoder pretrains on frames.mp4
    main(["pretrain", "video", *TINY_VIDEO, f"data.path={tmp_path / 'eps'}", "train.steps=1", "data.batch_size=3",
          f"run.dir={tmp_path / 'enc'}"])
    main(["pretrain", "worldmodel", *TINY_WM, f"worldmodel.encoder={tmp_path / 'enc/last.pt'}",
          f"data.path={tmp_path / 'eps'}", "train.steps=2", f"run.dir={tmp_path / 'wm'}"])
    wm = WorldModel.load(tmp_path / "wm/last.pt", device="cpu")
    assert wm.observer.modality == "video" and wm.observer.history == 6  # 4 frames, every 2nd
    ep = read_episode(tmp_path / "eps/ep_000")
    clips = wm.observer.inputs(ep.frames)
    assert clips.shape == (7, 3, 4, 32, 32)
    assert all(torch.equal(clips[0][:, k], clips[0][:, 0]) for k in range(4))  # frame 0 four times
    assert torch.equal(clips[6][:, 0], clips[0][:, 0]) and torch.equal(clips[6][:, 1], clips[2][:, 3])  # 0, 2, 4, 6
    assert torch.equal(clips[5][:, 1], clips[1][:, 3]) and torch.equal(clips[5][:, 2], clips[3][:, 3])  # 0, 1, 3, 5
    assert wm.encode(ep.frames).shape == (7, 4, 32)  # a (2, 4, 4) grid pooled in 2-wide cells
    plan = wm.plan(ep.frames[:5], ep.frames[-1:], horizon=2, past_actions=ep.actions[3:4], context=2, samples=8,
                   iterations=1)
    assert plan.shape == (2, 2)
    with pytest.raises(MultijepaError, match="context=6 for 5 observations"):
        wm.plan(ep.frames[:5], ep.frames[-1:], horizon=2, context=6)
    z = wm.encode(ep.frames)
    assert torch.allclose(wm.rollout(ep.frames[:5], ep.actions[3:], context=2),  # frames 0-2: the clips' past
                          wm.rollout(z[None, 3:5], ep.actions[None, 3:])[0])
    with pytest.raises(MultijepaError, match="frames observations must be uint8"):
        wm.encode(ep.frames.float())


@pytest.mark.filterwarnings("ignore:step 1. target representations look collapsed")
def test_worldmodel__the_clips_recipe_as_documented(tmp_path):
    """recipes/clips.yaml as docs/world-models.md runs it: frames.mp4 episodes, a future-masked video encoder on
    4-frame clips (its own grid and masks, only the model shrunk), and a world model pooling its grid 2-wide."""
    _dot_episodes(tmp_path / "eps", episodes=3, steps=6, frames_as="mp4")
    main(["pretrain", "clips", *TINY, "mask.min_context=16", f"data.path={tmp_path / 'eps'}", "train.steps=1",
          "data.batch_size=3", f"run.dir={tmp_path / 'enc'}"])
    main(["pretrain", "worldmodel", *TINY_WM, f"worldmodel.encoder={tmp_path / 'enc/last.pt'}",
          f"data.path={tmp_path / 'eps'}", "train.steps=2", f"run.dir={tmp_path / 'wm'}"])
    wm = WorldModel.load(tmp_path / "wm/last.pt", device="cpu")
    assert wm.observer.recipe.mask.mode == "future" and wm.observer.history == 3  # 4 consecutive frames
    assert wm.encode(read_episode(tmp_path / "eps/ep_000").frames).shape == (7, 4, 32)  # (2, 4, 4) pooled 2-wide
    with pytest.raises(RecipeError, match="worldmodel.pool=4: the encoder's token grid \\(2, 4, 4\\)"):
        _train(*TINY_WM, "worldmodel.pool=4", f"worldmodel.encoder={tmp_path / 'enc/last.pt'}",
               f"data.path={tmp_path / 'eps'}", f"run.dir={tmp_path / 'wm4'}")


@pytest.mark.filterwarnings("ignore:step 1. target representations look collapsed")
def test_worldmodel__point_cloud_observations_through_a_point_cloud_encoder(tmp_path):
    """points.npy [T + 1, P, 3] per episode, folders and shards alike, read by a point-cloud encoder."""
    from multijepa.episodes import write_episode_shards

    rng = np.random.default_rng(0)
    clouds = tmp_path / "clouds"
    clouds.mkdir()
    for e in range(3):  # a box whose proportions the actions change
        actions = rng.uniform(-1, 1, (5, 3)).astype(np.float32)
        sides = np.exp(np.cumsum(np.concatenate([np.zeros((1, 3)), 0.3 * actions]), 0))  # [6, 3]
        points = (rng.uniform(-1, 1, (6, 200, 3)) * sides[:, None]).astype(np.float32)
        write_episode(tmp_path / "eps" / f"ep_{e}", actions, points=points)
        for t, cloud in enumerate(points):
            np.save(clouds / f"{e}_{t}.npy", cloud)
    main(["pretrain", "pointcloud", *TINY_POINTS, f"data.path={clouds}", "train.steps=1", f"run.dir={tmp_path / 'enc'}"])
    write_episode_shards(tmp_path / "eps", tmp_path / "shards")
    common = [*TINY_WM, "worldmodel.observation=points", f"worldmodel.encoder={tmp_path / 'enc/last.pt'}",
              "train.steps=2"]
    with pytest.raises(RecipeError, match="worldmodel.pool=2: the encoder's token grid None"):
        _train(*common, f"data.path={tmp_path / 'eps'}", f"run.dir={tmp_path / 'bad'}")
    main(["pretrain", "worldmodel", *common, "worldmodel.pool=1", f"data.path={tmp_path / 'shards'}",
          f"run.dir={tmp_path / 'wm'}"])
    wm = WorldModel.load(tmp_path / "wm/last.pt", device="cpu")
    ep = read_episode(tmp_path / "eps/ep_0")
    assert wm.observer.modality == "pointcloud" and wm.observer.history == 0
    assert wm.encode(ep.points).shape == (6, 16, 32)  # 16 groups, one token each
    assert wm.rollout(ep.points[:2], ep.actions).shape == (4, 16, 32)
    assert wm.plan(ep.points[:1], ep.points[-1:], horizon=2, samples=8, iterations=1).shape == (2, 3)
    with pytest.raises(DataError, match="has no points.npy, which worldmodel.observation=points reads"):
        write_episode(tmp_path / "flat" / "ep", np.zeros((2, 3)), state=np.zeros((3, 2)))
        _train(*common, "worldmodel.pool=1", f"data.path={tmp_path / 'flat'}", f"run.dir={tmp_path / 'wm2'}")


def test_worldmodel__trains_on_episode_shards(trained, tmp_path, capsys):
    from multijepa.episodes import write_episode_shards

    write_episode_shards(trained / "eps", tmp_path / "shards", per_shard=4)
    run = _train(*TINY_WM, f"worldmodel.encoder={trained / 'enc/last.pt'}", f"data.path={tmp_path / 'shards'}",
                 "train.steps=2", f"run.dir={tmp_path / 'wm'}")
    assert "6 episodes (5 train, 1 val)" in capsys.readouterr().err
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 2


def test_worldmodel__bad_recipes_and_data_are_named(trained, tmp_path):
    args = [str(ROOT / "recipes/worldmodel.yaml"), *TINY_WM, f"worldmodel.encoder={trained / 'enc/last.pt'}"]
    with pytest.raises(RecipeError, match="unknown key 'worldmodel.windw' .*did you mean 'window'"):
        load_worldmodel_recipe(ROOT / "recipes/worldmodel.yaml", ["worldmodel.windw=3"])
    with pytest.raises(RecipeError, match="worldmodel.rollout_steps"):
        load_worldmodel_recipe(ROOT / "recipes/worldmodel.yaml", ["worldmodel.rollout_steps=9", "worldmodel.window=4"])
    with pytest.raises(RecipeError, match="worldmodel.rollout_context"):
        load_worldmodel_recipe(ROOT / "recipes/worldmodel.yaml", ["worldmodel.rollout_context=0"])
    with pytest.raises(RecipeError, match=r"worldmodel.rollout_steps.*window \+ 1 - worldmodel.rollout_context = 3"):
        load_worldmodel_recipe(ROOT / "recipes/worldmodel.yaml", ["worldmodel.window=4", "worldmodel.rollout_context=2",
                                                                  "worldmodel.rollout_steps=4"])
    with pytest.raises(RecipeError, match="a world-model recipe"):
        from multijepa.recipe import load_recipe

        load_recipe(ROOT / "recipes/worldmodel.yaml")
    with pytest.raises(RecipeError, match="needs an encoder trained on timeseries"):
        _train(*args[1:], "worldmodel.observation=state", f"data.path={trained / 'eps'}", f"run.dir={tmp_path / 'a'}")
    with pytest.raises(DataError, match="no episode has worldmodel.window=40 steps"):
        _train(*args[1:], "worldmodel.window=40", "worldmodel.rollout_steps=2", f"data.path={trained / 'eps'}",
               f"run.dir={tmp_path / 'b'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no episodes"):
        _train(*args[1:], f"data.path={tmp_path / 'empty'}", f"run.dir={tmp_path / 'c'}")
    with pytest.raises(MultijepaError, match="not a world-model checkpoint"):
        WorldModel.load(trained / "enc/last.pt")


def test_plan__closed_loop_in_reacher_with_the_cli(tmp_path, capsys, monkeypatch):
    pytest.importorskip("mujoco")
    from multijepa.episodes import record

    record("Reacher-v5", tmp_path / "eps", episodes=3, steps=6, size=16, policy="smooth")
    main(["pretrain", str(ROOT / "recipes/frames.yaml"), *TINY_IMAGE, f"data.path={tmp_path / 'eps'}",
          "train.steps=1", f"run.dir={tmp_path / 'enc'}"])
    main(["pretrain", "worldmodel", *TINY_WM, f"worldmodel.encoder={tmp_path / 'enc/last.pt'}",
          f"data.path={tmp_path / 'eps'}", "train.steps=2", f"run.dir={tmp_path / 'wm'}"])
    main(["plan", str(tmp_path / "wm/last.pt"), "--episodes", "2", "--steps", "3", "--horizon", "2", "--samples", "8",
          "--iterations", "1", "--json", str(tmp_path / "plan.json")])
    out = capsys.readouterr().out
    assert "Reacher-v5, plan (cem): success" in out and "over 2 episodes" in out
    wm = WorldModel.load(tmp_path / "wm/last.pt")
    assert wm.render == {"env": "Reacher-v5", "camera": CAMERAS["Reacher-v5"], "action_repeat": 1}
    recorded = read_episode(tmp_path / "eps/ep_000000").frames[0].float()  # the reset of seed 0, as recorded
    for camera, same in ((wm.render["camera"], True), (None, False)):    # plan renders the recording's view
        task = ReacherGoals(size=16, camera=camera)
        start = task.reset(0)[0]["frames"].float()  # the same arm; only the target dot has moved
        task.close()
        assert ((start - recorded).abs().mean() < 10) == same
    result = json.loads((tmp_path / "plan.json").read_text())
    assert len(result["distances"]) == 2 and 0 <= result["success_rate"] <= 1
    random = evaluate_planning(None, "Reacher-v5", episodes=2, steps=3, policy="random")
    assert random["policy"] == "random" and len(random["distances"]) == 2 and random["action_repeat"] == 1
    assert wm.render["action_repeat"] == 1 and result["action_repeat"] == 1
    # actions held for 2 environment steps: 7 steps are 4 decisions (2 + 2 + 2 + 1), the same time as 7 of 1
    held, step = [], ReacherGoals.step
    monkeypatch.setattr(ReacherGoals, "step", lambda self, action, repeat=1: held.append(repeat) or
                        step(self, action, repeat))
    result = evaluate_planning(None, "Reacher-v5", episodes=1, steps=7, policy="random", action_repeat=2)
    assert result["action_repeat"] == 2
    assert held == [2, 2, 2, 1]
    assert main(["plan", "--episodes", "1"]) == 2
    assert "give a world model's last.pt" in capsys.readouterr().err
    with pytest.raises(MultijepaError, match="replan every 1 to horizon=2"):
        evaluate_planning(None, "Reacher-v5", horizon=2, replan_every=3, policy="random")
    with pytest.raises(MultijepaError, match="no goal task for 'Pendulum-v1'"):
        evaluate_planning(None, "Pendulum-v1", policy="random")
