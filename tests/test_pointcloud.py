"""Point clouds: open3d readers, bad files, FPS / kNN against brute force, transforms, tokenizer, masks, CLI."""

import json
import math
import re

import numpy as np
import pytest
import torch

import multijepa
from conftest import ROOT, TINY, run_cli
from multijepa.core.masking import sample_neighbourhood_masks, validate_neighbourhood_mask
from multijepa.datasets.files import detect_format, index_files, load_input
from multijepa.datasets.mixed import build_train_loader
from multijepa.datasets.shards import write_shards
from multijepa.errors import DecodeError, RecipeError
from multijepa.modalities import modality_of
from multijepa.readers import PointSet, read_points
from multijepa.recipe import MaskConfig, PointCloudConfig, load_recipe
from multijepa.tokenizers.pointcloud import (farthest_point_sample, fourier_embed, group_points, knn, morton_order,
                                             pointcloud_tokenizer)
from multijepa.train import build_model, pretrain
from multijepa.transforms import normalize_points, pointcloud_transform

o3d = pytest.importorskip("open3d")

RECIPE = str(ROOT / "recipes/pointcloud.yaml")
TINY_POINTS = TINY + ["pointcloud.num_points=128", "pointcloud.num_groups=16", "pointcloud.group_size=8",
                      "pointcloud.pointnet_width=16", "mask.min_context=2"]


def sphere_mesh():
    mesh = o3d.geometry.TriangleMesh.create_sphere(radius=2.0, resolution=6)
    mesh.vertex_colors = o3d.utility.Vector3dVector(np.full((len(mesh.vertices), 3), 0.5))
    mesh.compute_triangle_normals()  # STL stores face normals
    return mesh


def cloud(n=200, seed=0, colors=True, normals=True, shape="sphere"):
    rng = np.random.default_rng(seed)
    xyz = rng.normal(size=(n, 3))
    xyz = xyz / np.linalg.norm(xyz, axis=1, keepdims=True) if shape == "sphere" else rng.uniform(-1, 1, (n, 3))
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(xyz * 3 + 5))
    if normals:
        pcd.normals = o3d.utility.Vector3dVector(xyz)
    if colors:
        pcd.colors = o3d.utility.Vector3dVector(rng.uniform(0, 1, (n, 3)))
    return pcd


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One file of every readable type, with normals and colours where the format holds them."""
    root = tmp_path_factory.mktemp("pointfiles")
    out = {}
    for ext in ("ply", "pcd", "xyz", "xyzn", "xyzrgb", "pts"):
        out[ext] = root / f"points.{ext}"
        assert o3d.io.write_point_cloud(str(out[ext]), cloud())
    for ext in ("off", "obj", "stl"):
        out[ext] = root / f"mesh.{ext}"
        assert o3d.io.write_triangle_mesh(str(out[ext]), sphere_mesh())
    out["mesh.ply"] = root / "mesh.ply"
    o3d.io.write_triangle_mesh(str(out["mesh.ply"]), sphere_mesh())
    xyzn = np.c_[np.asarray(cloud().points), np.asarray(cloud().normals)]
    out["npy"] = root / "points.npy"
    np.save(out["npy"], xyzn.astype(np.float32))
    out["txt"] = root / "points.txt"
    np.savetxt(out["txt"], xyzn, delimiter=",")
    return out


@pytest.mark.parametrize("key,normals,colors", [
    ("ply", True, True), ("pcd", True, True), ("xyz", False, False), ("xyzn", True, False),
    ("xyzrgb", False, True), ("pts", False, True), ("npy", True, False), ("txt", True, False),
])
def test_read_points__point_files_keep_their_features(files, key, normals, colors):
    p = read_points(files[key])
    assert p.xyz.shape == (200, 3) and p.xyz.dtype == torch.float32
    assert np.allclose(p.xyz.numpy(), np.asarray(cloud().points), atol=1e-4)
    assert (p.normals is not None) == normals and (p.colors is not None) == colors
    if normals:
        assert torch.allclose(p.normals.norm(dim=1), torch.ones(200), atol=1e-4)


@pytest.mark.parametrize("key", ["mesh.ply", "off", "obj", "stl"])
def test_read_points__meshes_sampled_on_the_surface_with_normals(files, key):
    p = read_points(files[key], mesh_points=300)
    assert p.xyz.shape == (300, 3) and p.normals.shape == (300, 3)
    assert torch.allclose(p.xyz.norm(dim=1), torch.full((300,), 2.0), atol=0.15)  # on the sphere of radius 2
    assert (p.colors is not None) == (key != "stl")  # STL holds no colours
    again = read_points(files[key], mesh_points=300)
    assert torch.equal(p.xyz, again.xyz)  # the same file always gives the same points


def test_read_points__poisson_disk_sampling_spreads_points(files):
    uniform = read_points(files["off"], mesh_points=200).xyz
    poisson = read_points(files["off"], mesh_points=200, mesh_sampling="poisson").xyz
    assert poisson.shape == (200, 3)

    def nearest_gap(x):
        d = torch.cdist(x, x) + torch.eye(len(x)) * 1e9
        return d.min(1).values.min()

    assert nearest_gap(poisson) > nearest_gap(uniform)


def test_read_points__bytes_go_through_a_temporary_file(files):
    for key in ("pcd", "off", "npy"):
        from_bytes = read_points(files[key].read_bytes(), name=f"shard.tar:000001.{files[key].suffix[1:]}")
        assert torch.equal(from_bytes.xyz, read_points(files[key]).xyz)


@pytest.mark.parametrize("name,source,match", [
    ("empty.pcd", None, "empty"), ("garbage.pcd", None, "cannot read"), ("garbage.ply", None, "cannot read"),
    ("garbage.off", None, "cannot read"), ("garbage.obj", None, "no points"), ("garbage.xyz", None, "no points"),
    ("garbage.npy", None, "cannot read"), ("garbage.txt", None, "cannot read"),
    ("truncated.pcd", "pcd", "cannot read"), ("truncated.ply", "mesh.ply", "cannot read"),
    ("truncated.off", "off", "cannot read"),
])
def test_read_points__corrupt_files_raise_naming_the_file(tmp_path, files, name, source, match):
    path = tmp_path / name
    if source:  # the first half of a good file
        data = files[source].read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(b"" if name.startswith("empty") else b"this is not a point cloud at all\n" * 5)
    with pytest.raises(DecodeError, match=match) as e:
        read_points(path)
    assert str(path) in str(e.value)


def test_read_points__missing_folder_wrong_shape_and_nan(tmp_path):
    with pytest.raises(DecodeError, match="no such file") as e:
        read_points(tmp_path / "gone.pcd")
    assert "gone.pcd" in str(e.value)
    (tmp_path / "folder.ply").mkdir()
    with pytest.raises(DecodeError, match="folder"):
        read_points(tmp_path / "folder.ply")
    np.save(tmp_path / "flat.npy", np.zeros((10, 2)))
    with pytest.raises(DecodeError, match=r"shape \[points, 3 or more\]"):
        read_points(tmp_path / "flat.npy")
    np.save(tmp_path / "nan.npy", np.full((4, 3), np.nan))
    with pytest.raises(DecodeError, match="NaN"):
        read_points(tmp_path / "nan.npy")


def test_modality_of__point_and_mesh_types():
    assert {modality_of(f"a.{e}") for e in ("PLY", "pcd", "xyz", "off", "obj", "stl")} == {"pointcloud"}
    for shared in ("a.npy", "a.txt"):  # an array or a text table can be either: the checkpoint decides
        with pytest.raises(DecodeError, match="timeseries or pointcloud.*--checkpoint"):
            modality_of(shared)


# --------------------------------------------------------------------------- FPS, kNN, grouping


def fps_reference(xyz: np.ndarray, num: int) -> list[int]:
    """The textbook greedy definition, one point at a time."""
    picked = [0]
    for _ in range(num - 1):
        gap = [min(np.sum((xyz[i] - xyz[j]) ** 2) for j in picked) for i in range(len(xyz))]
        picked.append(int(np.argmax(gap)))
    return picked


def test_farthest_point_sample__matches_brute_force_reference():
    x = torch.rand(3, 120, 3, generator=torch.Generator().manual_seed(0))
    got = farthest_point_sample(x, 16)
    for b in range(3):
        assert got[b].tolist() == fps_reference(x[b].double().numpy(), 16)


def test_knn__matches_brute_force_distances():
    g = torch.Generator().manual_seed(1)
    pts, query = torch.rand(2, 300, 3, generator=g), torch.rand(2, 20, 3, generator=g)
    got = knn(query, pts, 10)
    full = ((query.unsqueeze(2) - pts.unsqueeze(1)) ** 2).sum(-1)  # [B, M, P] exact
    want = full.sort(dim=-1).values[..., :10]
    assert torch.allclose(full.gather(2, got), want, atol=1e-5)  # the same neighbours, nearest first
    assert all(len(set(row.tolist())) == 10 for row in got.reshape(-1, 10))


def test_group_points__centres_first_and_members_are_nearest():
    x = torch.rand(2, 200, 6, generator=torch.Generator().manual_seed(2))
    groups = group_points(x, 12, 9)
    assert groups.shape == (2, 12, 9, 6)
    centres = groups[:, :, 0, :3]
    fps = x[torch.arange(2).unsqueeze(1), farthest_point_sample(x[..., :3], 12)][..., :3]
    for b in range(2):  # the same centres as FPS, reordered
        assert sorted(map(tuple, centres[b].tolist())) == sorted(map(tuple, fps[b].tolist()))
        d = ((centres[b].unsqueeze(1) - x[b, :, :3].unsqueeze(0)) ** 2).sum(-1)
        member_d = ((groups[b, :, :, :3] - centres[b].unsqueeze(1)) ** 2).sum(-1)
        assert torch.allclose(member_d.max(1).values, d.sort(1).values[:, 8], atol=1e-5)
    assert torch.equal(groups, group_points(x, 12, 9))  # deterministic


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_group_points__cuda_matches_cpu():
    x = torch.rand(4, 2048, 3, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(group_points(x.cuda(), 32, 16).cpu(), group_points(x, 32, 16))


def test_morton_order__permutation_and_spatially_coherent():
    x = torch.rand(4, 64, 3, generator=torch.Generator().manual_seed(3))
    order = morton_order(x)
    assert all(sorted(o.tolist()) == list(range(64)) for o in order)
    seq = x[torch.arange(4).unsqueeze(1), order]
    step = (seq[:, 1:] - seq[:, :-1]).norm(dim=-1).mean()
    shuffled = (x[:, 1:] - x[:, :-1]).norm(dim=-1).mean()
    assert step < 0.7 * shuffled


# --------------------------------------------------------------------------- transforms


def test_normalize_points__unit_sphere():
    x = normalize_points(torch.rand(100, 3) * 50 + 7)
    assert torch.allclose(x.mean(0), torch.zeros(3), atol=1e-5)
    assert x.norm(dim=1).max() == pytest.approx(1.0, abs=1e-5)


def test_pointcloud_transform__embedding_is_fixed_and_normalised():
    cfg = PointCloudConfig(num_points=64)
    p = PointSet(torch.rand(500, 3) * 10)
    a, b = pointcloud_transform(p, cfg, None), pointcloud_transform(p, cfg, None)
    assert a.shape == (64, 3) and torch.equal(a, b) and a.norm(dim=1).max() <= 1 + 1e-5
    few = pointcloud_transform(PointSet(torch.rand(10, 3)), cfg, None)  # fewer points than asked: repeats
    assert few.shape == (64, 3) and len({tuple(r) for r in few.tolist()}) == 10


def test_pointcloud_transform__rotation_turns_about_the_up_axis_only():
    cfg = PointCloudConfig(num_points=200, rotate=True, scale=(1.0, 1.0), jitter=0.0, up_axis="y",
                           features=("normals",))
    half = torch.randn(100, 3)
    xyz = torch.cat([half, -half])  # centred already, so normalising keeps normals = directions
    p = PointSet(xyz, normals=torch.nn.functional.normalize(xyz, dim=1))
    still = pointcloud_transform(p, cfg, None)
    turned = pointcloud_transform(p, cfg, torch.Generator().manual_seed(0))
    by_up = lambda t: t[t[:, 1].argsort()]  # noqa: E731  (same points, new order: compare sorted by y)
    s, t = by_up(still), by_up(turned)
    assert torch.allclose(s[:, 1], t[:, 1], atol=1e-5)  # heights kept
    assert torch.allclose(s[:, [0, 2]].norm(dim=1), t[:, [0, 2]].norm(dim=1), atol=1e-5)  # radii kept
    assert not torch.allclose(s, t, atol=1e-2)
    assert torch.allclose(t[:, 3:].norm(dim=1), torch.ones(200), atol=1e-5)
    assert torch.allclose(t[:, 3:], torch.nn.functional.normalize(t[:, :3], dim=1), atol=1e-4)  # normals turned too


def test_pointcloud_transform__scale_and_jitter_within_bounds():
    cfg = PointCloudConfig(num_points=256, scale=(0.5, 0.5), jitter=0.02)
    p = PointSet(torch.rand(256, 3))
    base = pointcloud_transform(p, PointCloudConfig(num_points=256, jitter=0.0, scale=(1.0, 1.0)), None)
    for seed in range(5):
        x = pointcloud_transform(p, cfg, torch.Generator().manual_seed(seed))
        assert x.shape == (256, 3) and torch.isfinite(x).all()
        assert x.abs().max() <= 0.5 + 3 * 0.02 + 1e-5  # scaled by 0.5, jitter clipped at 3 std
        d = torch.cdist(x, base * 0.5).min(1).values  # every point: a scaled, jittered input point
        assert d.max() <= math.sqrt(3) * 3 * 0.02 + 1e-5 and d.max() > 0


def test_pointcloud_transform__dropout_keeps_the_count_with_repeats():
    cfg = PointCloudConfig(num_points=256, scale=(1.0, 1.0), jitter=0.0, dropout=0.9)
    p = PointSet(torch.rand(256, 3))
    distinct = [len({tuple(r) for r in pointcloud_transform(p, cfg, torch.Generator().manual_seed(s)).tolist()})
                for s in range(5)]
    assert max(distinct) <= 256 and min(distinct) < 200
    assert len({tuple(r) for r in pointcloud_transform(p, cfg, None).tolist()}) == 256  # never when embedding


def test_pointcloud_transform__missing_feature_names_file_and_key():
    with pytest.raises(DecodeError, match="shape.xyz.*no colors.*pointcloud.features"):
        pointcloud_transform(PointSet(torch.rand(10, 3)), PointCloudConfig(features=("colors",)), None, "shape.xyz")


# --------------------------------------------------------------------------- tokenizer and masks


def test_tokenizer__shapes_no_nan_backward_and_grouped_input_equal():
    tok = pointcloud_tokenizer(in_channels=6, dim=24, num_groups=10, group_size=8, width=16)
    clouds = torch.randn(3, 100, 6, requires_grad=True)
    tokens, coords = tok(clouds)
    assert tokens.shape == (3, 10, 24) and coords.shape == (3, 10, 3) and torch.isfinite(tokens).all()
    tokens.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in tok.parameters())
    groups = group_points(clouds.detach(), 10, 8)
    again, centres = tok(groups)
    assert torch.allclose(again, tokens, atol=1e-6) and torch.equal(centres, groups[:, :, 0, :3])
    keep = torch.tensor([[0, 3, 5], [1, 2, 9], [4, 6, 7]])
    some, some_coords = tok(groups, keep)
    assert torch.allclose(some, tokens.gather(1, keep.unsqueeze(-1).expand(-1, -1, 24)), atol=1e-6)
    assert torch.equal(some_coords, centres.gather(1, keep.unsqueeze(-1).expand(-1, -1, 3)))


def test_fourier_embed__distinct_codes_for_nearby_points():
    e = fourier_embed(torch.tensor([[[0.0, 0.0, 0.0], [0.02, 0.0, 0.0], [0.5, 0.5, 0.5]]]), 48)
    assert e.shape == (1, 3, 48) and (e[0, 0] - e[0, 1]).norm() > 0.1


def draw(cfg, n=64, batch=16, draws=20):
    g = torch.Generator().manual_seed(0)
    coords = torch.rand(batch, n, 3, generator=g)
    return coords, [sample_neighbourhood_masks(coords, cfg, g) for _ in range(draws)]


def test_neighbourhood_masks__disjoint_sized_and_min_context():
    cfg = MaskConfig()
    coords, results = draw(cfg)
    for context, target in results:
        assert target.shape[:2] == (16, 4) and context.shape[1] >= cfg.min_context
        assert round(0.15 * 64) <= target.shape[2] <= round(0.2 * 64)
        for c, t in zip(context, target):
            assert len(set(c.tolist())) == len(c) and not set(c.tolist()) & set(t.flatten().tolist())


def test_neighbourhood_masks__blocks_are_the_tokens_nearest_one_seed():
    coords, results = draw(MaskConfig(num_targets=2))
    for _, target in results[:5]:
        for b in range(len(coords)):
            d = torch.cdist(coords[b], coords[b])
            for block in target[b]:
                inside = set(block.tolist())
                # some token in the block has exactly the block as its nearest neighbours
                assert any(set(d[s].argsort()[: len(block)].tolist()) == inside for s in block.tolist())


def test_neighbourhood_masks__every_token_sometimes_target_and_sometimes_context():
    coords, results = draw(MaskConfig(), batch=4, draws=100)
    as_target, as_context = torch.zeros(4, 64), torch.zeros(4, 64)
    for context, target in results:
        as_target.scatter_add_(1, target.flatten(1), torch.ones(4, target[0].numel()))
        as_context.scatter_add_(1, context, torch.ones_like(context, dtype=torch.float))
    assert (as_target > 0).all() and (as_context > 0).all()


def test_neighbourhood_masks__tight_settings_still_end():
    cfg = MaskConfig(num_targets=8, target_scale=(0.4, 0.5), context_scale=(0.1, 0.2), min_context=3)
    validate_neighbourhood_mask(cfg, 10, "test")
    _, results = draw(cfg, n=10, draws=5)
    assert all(c.shape[1] >= 3 for c, _ in results)


@pytest.mark.parametrize("override,key", [
    ("pointcloud.num_groups=2000", "pointcloud.num_groups"),
    ("pointcloud.group_size=0", "pointcloud.group_size"),
    ("pointcloud.scale=[1.2,0.9]", "pointcloud.scale"),
    ("pointcloud.dropout=1.0", "pointcloud.dropout"),
    ("pointcloud.features=[normals,normals]", "pointcloud.features"),
    ("pointcloud.features=[curvature]", "pointcloud.features[0]"),
    ("pointcloud.mesh_sampling=random", "pointcloud.mesh_sampling"),
    ("mask.target_scale=[0.9,0.95]", "mask.target_scale"),
    ("mask.full_span_axes=[0]", "mask.full_span_axes"),
])
def test_recipe__impossible_pointcloud_values_name_the_key(override, key):
    with pytest.raises(RecipeError, match=re.escape(f"'{key}'")):
        load_recipe(RECIPE, [override])


@pytest.mark.parametrize("pos", ["mlp", "fourier"])
def test_recipe__builds_and_trains_one_step_on_each_position_code(pos):
    recipe = load_recipe(RECIPE, TINY_POINTS + [f"pointcloud.pos_encoding={pos}", "pointcloud.features=[normals]"])
    model = build_model(recipe)
    groups = group_points(torch.randn(4, 128, 6), 16, 8)
    ctx, tgt = sample_neighbourhood_masks(groups[:, :, 0, :3], recipe.mask, torch.Generator().manual_seed(0))
    out = model({"pointcloud": {"input": groups, "context_idx": ctx, "target_idx": tgt}})
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["target_pooled"].shape == (4, 32)
    assert all(p.grad is not None for p in model.context.parameters())


# --------------------------------------------------------------------------- data and CLI


@pytest.fixture(scope="module")
def shapes3d(tmp_path_factory):
    """A labelled folder: spheres as .pcd and cubes as .ply, 6 each, 150 points, not normalised."""
    root = tmp_path_factory.mktemp("shapes3d")
    for kind, ext in (("sphere", "pcd"), ("cube", "ply")):
        (root / kind).mkdir()
        for i in range(6):
            o3d.io.write_point_cloud(str(root / kind / f"{kind}_{i}.{ext}"),
                                     cloud(150, seed=i, colors=False, normals=False, shape=kind))
    return root


def test_data_path__txt_is_a_file_list_or_a_point_array_by_content(tmp_path, shapes3d, files):
    listed = tmp_path / "train.txt"
    listed.write_text("".join(f"{f} {f.parent.name}\n" for f in sorted(shapes3d.rglob("*.p*"))))
    as_list = load_recipe(RECIPE, TINY_POINTS + [f"data.path={listed}"])
    assert detect_format(as_list) == "filelist" and len(index_files(as_list).files) == 12
    as_points = load_recipe(RECIPE, TINY_POINTS + [f"data.path={files['txt']}"])
    assert detect_format(as_points) == "file" and index_files(as_points).files == [str(files["txt"])]


def test_train_loader__batches_hold_groups_and_neighbourhood_masks(shapes3d):
    recipe = load_recipe(RECIPE, TINY_POINTS + [f"data.path={shapes3d}", "data.batch_size=4"])
    batch = next(iter(build_train_loader(recipe)))["parts"]["pointcloud"]
    assert batch["input"].shape == (4, 16, 8, 3) and batch["target_idx"].shape[:2] == (4, 4)
    assert int(batch["context_idx"].max()) < 16
    again = next(iter(build_train_loader(recipe)))["parts"]["pointcloud"]
    assert torch.equal(batch["input"], again["input"]) and torch.equal(batch["target_idx"], again["target_idx"])
    x = load_input(next(shapes3d.rglob("*.pcd")), recipe)
    assert x.shape == (128, 3) and x.norm(dim=1).max() == pytest.approx(1.0, abs=1e-4)


def test_cli__pretrain_resume_and_embed_every_file_type(tmp_path, shapes3d, files):
    args = [RECIPE, *TINY_POINTS, f"data.path={shapes3d}", "run.dir=runs/pc", "data.batch_size=4"]
    run_cli("pretrain", *args, "train.steps=2", cwd=tmp_path)
    resumed = run_cli("pretrain", *args, "train.steps=4", cwd=tmp_path)
    assert "resuming" in resumed.stderr
    rows = [json.loads(line) for line in (tmp_path / "runs/pc/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in rows)
    shapes = [str(files[k]) for k in ("ply", "pcd", "off", "obj", "xyz", "stl", "npy")]
    out = run_cli("embed", *shapes, "--out", "v.npy", cwd=tmp_path)  # finds runs/pc by modality
    assert "using runs/pc/last.pt" in out.stderr
    vectors = np.load(tmp_path / "v.npy")
    assert vectors.shape == (7, 32) and np.isfinite(vectors).all()
    # .npy alone could be a time series or a cloud: the one modality with a trained model decides.
    only = run_cli("embed", str(files["npy"]), "--out", "n.npy", cwd=tmp_path)
    assert "using runs/pc/last.pt" in only.stderr
    assert np.allclose(np.load(tmp_path / "n.npy"), vectors[-1:], atol=1e-5)
    bad = tmp_path / "broken.pcd"
    bad.write_bytes(b"not a pcd")
    with pytest.raises(DecodeError, match="broken.pcd"):
        multijepa.load(tmp_path / "runs/pc/last.pt").embed([bad])


def test_pretrain__on_point_cloud_shards(tmp_path, shapes3d):
    write_shards(shapes3d, tmp_path / "shards", per_shard=8)
    recipe = load_recipe(RECIPE, TINY_POINTS + [f"data.path={tmp_path / 'shards'}", f"run.dir={tmp_path / 'run'}",
                                                "train.steps=2", "data.batch_size=4"])
    pretrain(recipe)
    assert torch.load(tmp_path / "run/last.pt", weights_only=True)["step"] == 2
