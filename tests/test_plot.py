"""multijepa.plot: run folders drawn as one PNG; clear errors for folders that are not (yet) runs."""

import json
import math
import sys

import pytest
from PIL import Image

from conftest import IMAGE_RECIPE, TINY_IMAGE
from multijepa.errors import MultijepaError
from multijepa.plot import _figure, _labels, _read_metrics, _Run, _thresholds, plot_runs
from multijepa.recipe import TrainConfig

BLUE, ORANGE = (31, 119, 180), (255, 127, 14)  # tab10's first two: the first two runs' colours


def record(step: int, modalities=(), drop=()) -> dict:
    """One metrics.jsonl line as multijepa pretrain writes it, with made-up values."""
    r = {"step": step, "loss": 2 * math.exp(-step / 20) + 0.1, "loss_prediction": 1.5 * math.exp(-step / 20) + 0.05,
         "loss_regularizer": 0.3 * math.exp(-step / 40) + 0.01, "padding_waste": 0.0, "lr": 1e-3 * min(1, step / 10),
         "weight_decay": 0.04, "ema_momentum": 0.996, "samples_per_s": 500.0 + step % 7, "data_wait": 0.2,
         "bad_files": step // 20, "target_std": math.exp(-step / 15), "target_erank": 1 + 20 * math.exp(-step / 30)}
    r.update({f"loss_prediction_{m}": 1.0 + i + step / 100 for i, m in enumerate(modalities)})
    return {k: v for k, v in r.items() if k not in drop}


def write_run(folder, steps=40, recipe="train:\n  collapse_std: 0.02\n", **kw):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(record(s, **kw)) + "\n" for s in range(2, steps + 1, 2)))
    if recipe is not None:
        (folder / "recipe.yaml").write_text(recipe)
    return folder


def check_png(path, min_size=(600, 400)) -> Image.Image:
    """``path`` is a readable PNG of at least ``min_size`` pixels with more than one colour in it."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1], image.size
        rgb = image.convert("RGB")
    assert len(rgb.getcolors(maxcolors=10**7)) > 1
    return rgb


def has_colour(image: Image.Image, colour, tolerance=6) -> bool:
    return any(all(abs(a - b) <= tolerance for a, b in zip(c, colour)) for _, c in image.getcolors(maxcolors=10**7))


def test_plot_runs__one_run_writes_metrics_png_into_the_run_folder(tmp_path):
    run = write_run(tmp_path / "run")
    before = "matplotlib.pyplot" in sys.modules
    assert plot_runs([run]) == run / "metrics.png"
    image = check_png(run / "metrics.png")
    assert has_colour(image, BLUE) and not has_colour(image, ORANGE)
    assert before or "matplotlib.pyplot" not in sys.modules  # no pyplot, so no global backend or figure state
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl", "metrics.png", "recipe.yaml"]  # no temp left


def test_plot_runs__several_runs_overlaid_default_to_runs_png_in_the_current_folder(tmp_path, monkeypatch):
    a, b = write_run(tmp_path / "a/run"), write_run(tmp_path / "b/run", steps=30, recipe=None)
    monkeypatch.chdir(tmp_path)
    out = plot_runs([a, b, tmp_path / "a/../a/run"], title="two runs")  # the same run twice is drawn once
    assert out.resolve() == tmp_path / "runs.png"
    image = check_png(out)
    assert has_colour(image, BLUE) and has_colour(image, ORANGE)


def test_plot_runs__out_folder_is_created_and_a_folder_out_gets_the_default_name(tmp_path):
    run = write_run(tmp_path / "run")
    out = plot_runs([run / "metrics.jsonl"], out=f"{tmp_path}/new/deeper/")  # the file names its run
    assert out == tmp_path / "new/deeper/metrics.png"
    check_png(out)
    assert [p.name for p in out.parent.iterdir()] == ["metrics.png"]  # no temp file left
    with pytest.raises(MultijepaError, match=r"plot\.xyz: cannot write \.xyz images; name a \.png file"):
        plot_runs([run], out=tmp_path / "plot.xyz")


def test_labels__equal_folder_names_are_told_apart_by_their_parents(tmp_path):
    paths = [tmp_path / "lr1/seed0", tmp_path / "lr2/seed0", tmp_path / "x/lr2/seed0", tmp_path / "other"]
    assert _labels(paths[:2] + paths[3:]) == ["lr1/seed0", "lr2/seed0", "other"]
    assert _labels(paths) == ["lr1/seed0", str(paths[1].relative_to(tmp_path.parent)), "x/lr2/seed0", "other"]


def panels(runs) -> dict:
    """{panel title: number of curves} and the legend's labels of the figure for ``runs`` (no rendering)."""
    fig = _figure(runs, "title")
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    return {ax.get_title(): len(ax.lines) for ax in fig.axes if ax.get_title()}, legend


def loaded(folder, label="run"):
    return _Run(label, _read_metrics(folder / "metrics.jsonl"), *_thresholds(folder))


def test_figure__a_mixed_run_gets_a_panel_of_per_modality_losses(tmp_path):
    single, _ = panels([loaded(write_run(tmp_path / "single"))])
    mixed, legend = panels([loaded(write_run(tmp_path / "mixed", modalities=("audio", "image")))])
    assert "prediction loss per modality" not in single and mixed["prediction loss per modality"] == 2
    assert {"total loss", "prediction", "regularizer", "audio prediction", "image prediction"} <= set(legend)
    assert single["target std (collapse monitor)"] == 2  # the curve and its threshold line


def test_figure__curves_an_older_run_never_logged_are_left_out(tmp_path):
    old = write_run(tmp_path / "old", drop=("data_wait", "bad_files", "loss_regularizer", "target_erank"))
    new = write_run(tmp_path / "new", drop=("target_erank",))
    curves, legend = panels([loaded(old, "old"), loaded(new, "new")])
    assert curves["loss"] == 5 and curves["files that failed to decode (so far)"] == 1
    assert curves["target effective rank (collapse monitor)"] == 0  # drawn empty, saying "not logged"
    assert legend[:2] == ["old", "new"]
    check_png(plot_runs([old, new], out=tmp_path / "ages.png"))


def test_read_metrics__a_torn_last_line_is_skipped_and_nothing_else_lost(tmp_path):
    run = write_run(tmp_path / "run", steps=10)
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record(12))[:25])  # a run killed mid-write: no newline
    assert [r["step"] for r in _read_metrics(run / "metrics.jsonl")] == [2, 4, 6, 8, 10]


def test_read_metrics__a_step_logged_twice_keeps_its_last_record_in_step_order(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [record(2), record(4), {**record(2), "loss": 9.0}]) + "\n\n")
    records = _read_metrics(path)
    assert [r["step"] for r in records] == [2, 4] and records[0]["loss"] == 9.0


@pytest.mark.parametrize("text, line", [
    ('{"step": 2, "loss": 1}\n{"step": 4, "lo\n{"step": 6, "loss": 1}\n', 2),  # torn in the middle
    ('{"step": 2, "loss": 1}\n{"step": 4, "lo\n', 2),  # a last line that ends in a newline was written whole
    ('{"step": 2, "loss": 1}\n[1, 2]\n', 2),
    ('{"loss": 1}\n', 1),
])
def test_read_metrics__a_corrupt_line_names_the_file_and_line(tmp_path, text, line):
    (tmp_path / "metrics.jsonl").write_text(text)
    with pytest.raises(MultijepaError, match=rf"metrics\.jsonl, line {line}: .*repair or delete that line"):
        plot_runs([tmp_path])


def not_a_run(folder, case: str):
    """A path ``multijepa plot`` must refuse, of the kind ``case`` names."""
    if case == "file":
        (folder / "a.txt").write_text("x")
        return folder / "a.txt"
    if case in ("empty", "only_torn"):
        (folder / "metrics.jsonl").write_text("" if case == "empty" else '{"step": 2, "lo')
    if case == "parent_of_runs":
        write_run(folder / "runs/one")
        write_run(folder / "runs/two")
        return folder / "runs"
    return folder / "missing" if case == "missing" else folder


@pytest.mark.parametrize("case, message", [
    ("missing", r"missing: no such run folder; pass a folder that `multijepa pretrain` wrote"),
    ("no_metrics", r"no metrics\.jsonl here; is this a run folder\? Train into it first with `multijepa pretrain"),
    ("file", r"a\.txt: a file, not a run folder"),
    ("empty", r"metrics\.jsonl: no logged step yet; lower train\.log_every or train longer"),
    ("only_torn", r"metrics\.jsonl: no logged step yet"),
    ("parent_of_runs", r"runs: no metrics\.jsonl here, but its folders one, two are runs: pass those"),
])
def test_plot_runs__a_folder_that_is_not_a_run_is_refused_with_what_to_do(tmp_path, case, message):
    with pytest.raises(MultijepaError, match=message):
        plot_runs([not_a_run(tmp_path, case)])


def test_plot_runs__no_run_given_is_refused():
    with pytest.raises(MultijepaError, match="no run folder given"):
        plot_runs([])


def test_thresholds__from_the_recipe_else_the_dataclass_defaults(tmp_path):
    default = TrainConfig()
    assert _thresholds(write_run(tmp_path / "set")) == (0.02, default.collapse_erank)
    assert _thresholds(write_run(tmp_path / "none", recipe=None)) == (default.collapse_std, default.collapse_erank)
    with pytest.warns(UserWarning, match="recipe.yaml: unreadable"):
        assert _thresholds(write_run(tmp_path / "torn", recipe="train: [")) == (default.collapse_std,
                                                                                default.collapse_erank)
    with pytest.warns(UserWarning, match="'train.collapse_erank' is 'low', not a number"):
        assert _thresholds(write_run(tmp_path / "bad", recipe="train: {collapse_erank: low}"))[1] == \
            default.collapse_erank


def test_plot_runs__a_real_tiny_training_run(tmp_path, shapes):
    from multijepa.recipe import load_recipe
    from multijepa.train import pretrain

    run = pretrain(load_recipe(IMAGE_RECIPE, TINY_IMAGE + [f"data.path={shapes}", f"run.dir={tmp_path / 'run'}",
                                                           "train.steps=3", "train.checkpoint_every=3"]))
    check_png(plot_runs([run]))
