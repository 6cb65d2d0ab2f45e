"""benchmarks/: run_all's table from RESULT lines, and no benchmark quotes a speed measured elsewhere (every ratio it
prints is measured in the same run)."""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import run_all  # noqa: E402

#: edited by others; run_all reads their RESULT line when they print one
OTHERS = {"bench_callback_overhead.py", "bench_train_throughput.py"}

LINES = [
    "RESULT dissection ratio=1.24 spread=1.18-1.31 vs=forward_pass_over_the_same_loader forward_s=7.2 images=200 "
    "concepts=50 load=3.1",
    "RESULT train_throughput ratio=0.96 spread=0.94-0.97 plain_img_s=181 framework_img_s=174",
]


def test_parse_result_keeps_fields_in_order():
    assert run_all.parse_result("== not a result") is None
    res = run_all.parse_result(LINES[0])
    assert list(res) == ["name", "ratio", "spread", "vs", "forward_s", "images", "concepts", "load"]
    assert res["name"] == "dissection" and res["ratio"] == "1.24" and res["spread"] == "1.18-1.31"
    # the last RESULT line of an output counts
    assert run_all.last_result("x\nRESULT a ratio=1\nnoise\nRESULT a ratio=2\ntail")["ratio"] == "2"


def test_table_rows_and_rendering():
    runs = [{"name": "dissection", "result": run_all.parse_result(LINES[0]), "returncode": 0, "seconds": 61.4,
             "load": 9.9},
            {"name": "train_throughput", "result": run_all.parse_result(LINES[1]), "returncode": 0, "seconds": 130.0,
             "load": 4.25},
            {"name": "push", "result": None, "returncode": 1, "seconds": 3.0, "load": 2.0},
            {"name": "gradcam", "result": None, "returncode": 0, "seconds": 5.0, "load": 2.0},
            {"name": "callback_overhead", "skipped": "--quick (trains models)"}]
    rows = run_all.table_rows(runs)
    assert rows[0] == ["dissection", "1.24", "1.18-1.31", "forward pass over the same loader",
                       "forward_s=7.2 images=200 concepts=50", "61", "3.1"]  # the benchmark's own load figure
    # no vs field: the known comparison; no load field: the load run_all saw when it ended
    assert rows[1] == ["train_throughput", "0.96", "0.94-0.97", "plain PyTorch loop (framework / plain)",
                       "plain_img_s=181 framework_img_s=174", "130", "4.2"]
    assert rows[2][:2] == ["push", "FAILED (exit 1)"] and rows[3][:2] == ["gradcam", "no RESULT line"]
    assert rows[4][:2] == ["callback_overhead", "skipped"]
    for text in (run_all.render_plain(rows), run_all.render(rows), run_all.render_markdown(rows)):
        lines = text.splitlines()
        header = next(line for line in lines if "benchmark" in line)
        assert all(col in header for col in run_all.COLUMNS)
        row = next(line for line in lines if "dissection" in line)
        assert re.search(r"1\.24\b.*1\.18-1\.31.*forward pass over the same loader.*\b61\b.*3\.1", row), row
        assert any("FAILED (exit 1)" in line for line in lines)
    md = run_all.render_markdown(rows).splitlines()
    assert md[1] == "| --- | --- | --- | --- | --- | --- | --- |" and len(md) == 2 + len(rows)


def test_main_fails_on_unknown_benchmark(capsys):
    with pytest.raises(SystemExit):
        run_all.main(["--only", "no_such_benchmark"])
    assert "unknown benchmark" in capsys.readouterr().err


# ----- no speed from another machine --------------------------------------------------------------------------------
UNIT = r"(?:img/s|images?/s|images? per (?:cpu-)?second|it/s|samples?/s)"
OTHER = r"(?:reference|public (?:code|port|implementation)|netdissect\S*|captum|lucent|pytorch-grad-cam|authors')"
QUOTED = [
    re.compile(rf"\b\d+(?:\.\d+)?\s*{UNIT}", re.I),                        # "68 images/s"
    re.compile(rf"{OTHER}[^\n]{{0,40}}?\b\d+(?:\.\d+)?\s*x\b", re.I),       # "public code: 2.6x", "NetDissect 3.8x"
    re.compile(rf"{OTHER}[^\n]{{0,20}}?:\s*\d+(?:\.\d+)?\b", re.I),         # "(public code: 2.6; target <= 1.2)"
]
CONSTANT_NAME = re.compile(r"(REF|PUBLIC|PAPER|THROUGHPUT|IPS|IMAGES_PER|PER_S|SPEED|BASELINE)", re.I)


def quoted_speeds(source: str) -> list[str]:
    """Speeds of something else written into a benchmark: throughput figures, ratios next to another
    implementation's name, and numbers bound to names like REFERENCE_IMAGES_PER_S."""
    found = [m.group(0) for p in QUOTED for m in p.finditer(source)]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Constant) \
                and isinstance(node.value.value, (int, float)) and not isinstance(node.value.value, bool):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            found += [t.id for t in targets if isinstance(t, ast.Name) and CONSTANT_NAME.search(t.id)]
    return found


def test_the_check_finds_speeds_quoted_from_elsewhere():
    # what the benchmarks held before (bench_capsnet, bench_push, docs' NetDissect-Lite figure), and what still passes
    bad = ['"""Reference: the fastest public PyTorch port trained at about 68 images/s on this machine."""\n'
           'REFERENCE_IMAGES_PER_S = 68.0\nratio = ips / REFERENCE_IMAGES_PER_S\n',
           'print(f"push ratio {r:.2f} (public code: 2.6; target <= 1.2)")\n',
           '"""dissection / forward = 1.6 (NetDissect-Lite 3.8x)"""\n',
           'PUBLIC_RATIO: float = 2.6\n']
    for src in bad:
        assert quoted_speeds(src), src
    good = ('TARGET = 1.5\nratio = dynk / linear\nprint(f"captum LayerGradCam ratio {r:.2f}")\n'
            '"""batch 256, 512 features, 365 classes, K = 5 (the authors\' Places365 setting)"""\n')
    assert quoted_speeds(good) == []


@pytest.mark.parametrize("path", sorted(BENCH.glob("*.py")), ids=lambda p: p.name)
def test_no_benchmark_quotes_a_speed_measured_elsewhere(path):
    assert quoted_speeds(path.read_text()) == []


@pytest.mark.parametrize("path", sorted(p for p in BENCH.glob("bench_*.py") if p.name not in OTHERS),
                         ids=lambda p: p.name)
def test_each_benchmark_prints_a_ratio_measured_in_its_run(path):
    """Its RESULT line comes from common.result, whose ratio is a Spread of per-round measurements: interleaved()
    or a Spread built from the times of this run, never a number written in the file."""
    tree = ast.parse(path.read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    results = [c for c in calls if c.func.id == "result"]
    assert len(results) == 1, "one RESULT line per benchmark"
    assert any(c.func.id in ("interleaved", "Spread") for c in calls)
    ratio = results[0].args[1]
    assert not isinstance(ratio, ast.Constant)


def test_interleaved_pairs_each_candidate_with_the_baseline_timed_right_before_it(monkeypatch):
    import common
    calls = []
    seconds = iter([2.0, 3.0, 2.0, 1.0,    # round 1: base, a, base, b
                    4.0, 4.0, 1.0, 3.0])   # round 2
    monkeypatch.setattr(common, "synced_time", lambda fn: (fn(), next(seconds))[1])
    base, ratios = common.interleaved(lambda: calls.append("base"),
                                      {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=2)
    assert calls == ["base", "a", "b"] + ["base", "a", "base", "b"] * 2  # one untimed call of each first
    assert base == [2.0, 2.0, 4.0, 1.0] and ratios["a"] == [1.5, 1.0] and ratios["b"] == [0.5, 3.0]
    assert ratios["a"].median == 1.25 and ratios["b"].spread == "0.5-3"
    line = common.result("x", ratios["b"], "the base line", n=3)
    assert line.startswith("RESULT x ratio=1.75 spread=0.5-3 vs=the_base_line n=3 load=")
    assert run_all.parse_result(line)["vs"] == "the_base_line"


def test_quick_arguments_name_existing_scripts_and_options():
    scripts = run_all.scripts()
    assert set(run_all.QUICK_ARGS) | run_all.QUICK_SKIP <= set(scripts)
    for name, args in run_all.QUICK_ARGS.items():
        source = scripts[name].read_text()
        for flag in (a for a in args if a.startswith("--")):
            assert f'"{flag}"' in source, f"bench_{name}.py has no option {flag}"
