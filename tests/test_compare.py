"""compare.py on hand-made run folders: values copied exactly, missing metrics kept as missing, the latest
composability epoch, data-set grouping, bad input, and output that never lands in a run's files."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

import compare
from algorithms.composition_result import ClassBasis, ClassComposition, CompositionResult


def make_run(folder: Path, metrics: dict | None, overrides: list[str], dataset: str = "shapes",
             model: str = "cnn", status: str = "completed", compositions: dict[int, CompositionResult] | None = None,
             interp_errors: list[dict] | None = None) -> Path:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if metrics is not None:
        payload = {"status": status, "metrics": metrics, "choices": {"datamodule": dataset, "model": model}}
        if status == "failed":
            payload["error"] = "ValueError: boom"
        if interp_errors is not None:
            payload["interp_errors"] = interp_errors
        (folder / "metrics.json").write_text(json.dumps(payload))
    for epoch, result in (compositions or {}).items():
        result.save(folder / "interp" / "composability" / f"epoch_{epoch:03d}" / "composability.json")
    return folder


def composition(name: str, shares: dict[str, float], num_images: int = 10) -> ClassComposition:
    return ClassComposition(name, num_images, shares, 0.0, [(2, next(iter(shares)), 0.2)] if shares else [])


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    make_run(root / "0", {"test/acc": 0.91, "val/acc": 0.9, "interp/dissection/interpretable_units": 40.0,
                          "interp/composability/completeness": 0.75, "train/loss": 0.1},
             ["model=cnn", "model.dropout=0.0"],
             compositions={
                 0: CompositionResult([composition("red circle", {"old": 1.0})], {"completeness": 0.5}, epoch=0),
                 2: CompositionResult(
                     [composition("red circle", {"color=red": 0.41, "object=circle": 0.30}),
                      composition("blue square", {"color=blue": 0.55})], {"completeness": 0.75},
                     ibd=[ClassBasis("red circle", "red circle = red 90% + residual 10%", ["red"], [0.9], [0.9], 0.3,
                                     0.1),
                          ClassBasis("green ring", "green ring = green 50% + residual 50%", ["green"], [0.5], [0.5],
                                     0.7, 0.5)],
                     layer="backbone.conv4", epoch=2)},
             interp_errors=[{"callback": "featviz", "epoch": 2, "rank": 0, "error": "KeyError: 'layer'",
                             "traceback": "Traceback ..."}])
    make_run(root / "1", {"test/acc": 0.85, "val/acc": 0.8, "interp/dissection/interpretable_units": 31.0},
             ["model=cnn", "model.dropout=0.5"])
    make_run(root / "2", {}, ["model=cnn", "model.dropout=2.0"], status="failed")
    return root


def test_table_holds_each_runs_values_and_missing_metrics_stay_missing(sweep, tmp_path):
    out = compare.compare([sweep], quiet=True)
    assert out == (sweep / "comparison").resolve()
    rows = read_csv(out / "comparison.csv")
    assert [r["run"] for r in rows] == ["sweep/0", "sweep/1", "sweep/2"]  # the failed run is kept
    header = list(rows[0])
    # preferred order, then only the metrics that exist; train/loss is not a default column
    assert [h for h in header if "/" in h] == ["test/acc", "val/acc", "interp/dissection/interpretable_units",
                                              "interp/composability/completeness"]
    for row, job in zip(rows, ("0", "1", "2")):
        metrics = json.loads((sweep / job / "metrics.json").read_text())["metrics"]
        for col in ("test/acc", "val/acc", "interp/composability/completeness"):
            assert (float(row[col]) if row[col] else None) == metrics.get(col)
    assert rows[1]["interp/composability/completeness"] == ""
    assert rows[2]["status"] == "failed" and rows[2]["error"] == "ValueError: boom"
    assert [r["varying"] for r in rows] == ["model.dropout=0.0", "model.dropout=0.5", "model.dropout=2.0"]
    assert (out / "comparison.png").stat().st_size > 5000


def test_compositions_come_from_the_latest_epoch_side_by_side(sweep):
    out = compare.compare([sweep], quiet=True)
    rows = {r["class"]: r for r in read_csv(out / "compositions.csv")}
    assert rows["red circle"]["sweep/0"] == "color=red 41% + object=circle 30%"  # epoch 2, not epoch 0
    assert rows["blue square"]["sweep/0"] == "color=blue 55%"
    assert "green ring" not in rows  # IBD statements are not compositions
    assert rows["red circle"]["sweep/1"] == ""  # run without composability results: missing, not dropped
    md = (out / "compositions.md").read_text()
    assert "red circle = color=red 41% + object=circle 30%" in md and "sweep/1: (missing)" in md


def test_a_composability_file_that_is_not_a_composition_result_is_reported(tmp_path, capsys):
    run = make_run(tmp_path / "r", {"test/acc": 0.5}, ["model=cnn"])
    d = run / "interp" / "composability" / "epoch_001"
    d.mkdir(parents=True)
    (d / "composability.json").write_text(json.dumps({"classes": [{"class": "a", "statement": "a = x 100%"}]}))
    out = compare.compare([run], out=tmp_path / "cmp", quiet=True)
    assert "composability.json" in capsys.readouterr().err and not (out / "compositions.csv").exists()


def test_interpretation_errors_are_shown_in_the_table_and_the_report(sweep, capsys):
    out = compare.compare([sweep])
    rows = read_csv(out / "comparison.csv")
    assert [r["interp_errors"] for r in rows] == ["featviz@2: KeyError: 'layer'", "", ""]
    printed = capsys.readouterr().out
    assert "interp errors" in printed and "featviz@2: KeyError: 'layer'" in printed


def test_rerun_writes_into_its_own_folder_and_never_reads_it_as_a_run(sweep, capsys):
    compare.compare([sweep], quiet=True)
    before = {p: p.read_bytes() for p in sweep.rglob("*") if p.is_file() and "comparison" not in p.parts}
    out = compare.compare([sweep], quiet=True)
    assert len(read_csv(out / "comparison.csv")) == 3
    after = {p: p.read_bytes() for p in sweep.rglob("*") if p.is_file() and "comparison" not in p.parts}
    assert before == after  # run results untouched


def test_out_must_not_be_a_run_folder_or_a_foreign_folder(sweep, tmp_path):
    with pytest.raises(compare.CompareError, match="run folder"):
        compare.compare([sweep], out=sweep / "0", quiet=True)
    with pytest.raises(compare.CompareError, match="run folder"):
        compare.compare([sweep], out=sweep / "1" / "checkpoints", quiet=True)
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("mine")
    with pytest.raises(compare.CompareError, match="not written by compare.py"):
        compare.compare([sweep], out=foreign, quiet=True)
    assert (foreign / "todo.txt").read_text() == "mine"


def test_folder_without_runs_exits_nonzero_with_a_message(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert compare.main([str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err
    assert "no runs found" in err and "metrics.json" in err
    assert compare.main([str(tmp_path / "nowhere")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_corrupt_metrics_file_is_reported_and_the_other_runs_compared(tmp_path, capsys):
    root = tmp_path / "sweep"
    make_run(root / "0", {"test/acc": 0.5}, ["model=cnn"])
    make_run(root / "1", None, ["model=dynconn"])
    (root / "1" / "metrics.json").write_text('{"status": "completed", "metrics": {"test/acc": 0.')
    assert compare.main([str(root), "--out", str(tmp_path / "cmp")]) == 0
    rows = read_csv(tmp_path / "cmp" / "comparison.csv")
    assert [r["status"] for r in rows] == ["completed", "unreadable"]
    assert "corrupt metrics.json" in rows[1]["error"] and rows[1]["test/acc"] == ""
    # nothing readable at all: nothing to compare
    (root / "0" / "metrics.json").write_text("[1, 2]")
    assert compare.main([str(root), "--out", str(tmp_path / "cmp2")]) == 1
    assert "no run has a readable metrics.json" in capsys.readouterr().err


def test_runs_of_different_data_sets_are_grouped_with_a_warning(tmp_path, capsys):
    a = make_run(tmp_path / "a", {"test/acc": 0.9}, ["datamodule=shapes"], dataset="shapes")
    b = make_run(tmp_path / "b", {"test/acc": 0.7}, ["datamodule=digits"], dataset="digits")
    out = compare.compare([a, b], out=tmp_path / "cmp", quiet=True)
    assert "different data sets" in capsys.readouterr().err
    assert (out / "comparison_shapes.png").is_file() and (out / "comparison_digits.png").is_file()
    assert {r["dataset"] for r in read_csv(out / "comparison.csv")} == {"shapes", "digits"}


def test_metric_patterns_choose_and_order_columns(sweep):
    out = compare.compare([sweep], metrics=["val/*", "train/*", "test/acc"], quiet=True)
    header = list(read_csv(out / "comparison.csv")[0])
    assert [h for h in header if "/" in h] == ["val/acc", "train/loss", "test/acc"]


def test_wandb_project_runs_are_read_through_the_api(monkeypatch, tmp_path):
    import wandb

    class FakeRun:
        def __init__(self, name, acc):
            self.name, self.id, self.group, self.state, self.url = name, name, "sweep-a", "finished", None
            self.summary = {"test/acc": acc, "_step": 3, "note": "text"}
            self.config = {"model/_target_": "models.cnn.CNNClassifier", "model": {"k": 5}}

    seen = {}

    class FakeApi:
        def __init__(self, timeout=None):
            pass

        def runs(self, path, filters=None):
            seen.update(path=path, filters=filters)
            return [FakeRun("r1", 0.8), FakeRun("r2", 0.6)]

    monkeypatch.setattr(wandb, "Api", FakeApi)
    out = compare.compare([], out=tmp_path / "cmp", wandb_project="me/proj", wandb_group="sweep-a", quiet=True)
    assert seen == {"path": "me/proj", "filters": {"group": "sweep-a"}}
    rows = read_csv(out / "comparison.csv")
    assert [(r["run"], r["test/acc"]) for r in rows] == [("sweep-a/r1", "0.8"), ("sweep-a/r2", "0.6")]

    class OfflineApi:
        def __init__(self, timeout=None):
            raise ConnectionError("no network")

    monkeypatch.setattr(wandb, "Api", OfflineApi)
    with pytest.raises(compare.CompareError, match="Offline runs are not visible"):
        compare.compare([], out=tmp_path / "cmp2", wandb_project="me/proj", quiet=True)
