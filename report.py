"""Rebuild the HTML report of a run folder or of a sweep folder.

    python report.py outputs/train/runs/<run>            # <run>/report.html
    python report.py outputs/train/multiruns/<sweep>     # <sweep>/report.html + every job's page that is missing
    python report.py <sweep> --jobs                      # ... and rebuild every job's page too

A run's page is also written at the end of every run (pipeline/training.py) and a sweep's page at the end of every
multirun (`SweepReport`, a Hydra callback in conf/hydra/default.yaml). The sweep page shows compare.py's table (its
reading functions, not a copy of them), the per-class compositions side by side, each metric against each
hyper-parameter the sweep varied, and a link to each job's page.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import compare  # noqa: E402
from pipeline.report import REPORT, build_run_report  # noqa: E402
from pipeline.report import plots  # noqa: E402
from pipeline.report.page import esc, fmt, page, table  # noqa: E402

log = logging.getLogger("report")


def is_run(folder: Path) -> bool:
    return compare.find_run_dirs(folder) == [folder]


def _value(text: str) -> Any:
    """An override's value as a number when it is one (for the axis of a metric-vs-hyper-parameter plot)."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def build_sweep_report(sweep: Path, rebuild_jobs: bool = False) -> Path:
    """Write `<sweep>/report.html`; each job's own page is built first where it is missing (or always with
    `rebuild_jobs`), so that every link on the page resolves."""
    sweep = Path(sweep)
    runs = compare.gather([sweep])
    for r in runs:
        if rebuild_jobs or not (r.path / REPORT).is_file():
            try:
                build_run_report(r.path)
            except Exception as err:  # noqa: BLE001 - that job's row says so; the sweep page still renders
                log.error("report: no page for %s (%s: %s)", r.path, type(err).__name__, err)
    labels = compare.varying_overrides(runs)
    cols = compare.metric_columns(runs, list(compare.DEFAULT_METRICS))

    def job_link(r) -> str:
        rel = os.path.relpath(r.path / REPORT, sweep)
        name = esc(r.path.relative_to(sweep).as_posix() if r.path != sweep else r.name)
        return f'<a href="{esc(Path(rel).as_posix())}">{name}</a>' if (r.path / REPORT).is_file() else name

    rows = []
    for r, lab in zip(runs, labels):
        status = f'<span class="status {esc(r.status)}">{esc(r.status)}</span>'
        errs = f' <span class="err">{len(r.interp_errors)} interp error(s)</span>' if r.interp_errors else ""
        rows.append([job_link(r), esc(" ".join(lab) or r.model), status + errs,
                     *[f'<span class="num">{fmt(r.metrics.get(c))}</span>' for c in cols]])
    sections = [("jobs", "Jobs", f'<p class="muted">{len(runs)} job(s); the first column links each job\'s own '
                 f'page. Columns: compare.py\'s default metrics.</p>'
                 + table(["job", "varied", "status", *[c.replace("interp/", "") for c in cols]], rows, raw=True))]
    failed = [(r, r.error) for r in runs if r.error] + [(r, e) for r in runs for e in r.interp_errors]
    if failed:
        sections[0] = (sections[0][0], sections[0][1], sections[0][2] + "".join(
            f'<p class="err">{esc(r.name)}: {esc(e)}</p>' for r, e in failed))

    classes, comp_rows = compare.composition_table(runs)
    if classes:
        head = ["class", *[f"{r.path.relative_to(sweep).as_posix() if r.path != sweep else r.name}: "
                           f"{' '.join(lab) or r.model}" for r, lab in zip(runs, labels)]]
        sections.append(("compositions", "Class compositions",
                         '<p class="muted">Latest composability epoch of each job.</p>'
                         + table(head, [[c, *row] for c, row in zip(classes, comp_rows)])))

    varied = [dict(o.partition("=")[::2] for o in lab) for lab in labels]   # per job: parameter -> value
    plot_html = ""
    for key in dict.fromkeys(k for v in varied for k in v):
        points_by_metric = []
        for c in cols:
            pts = [(_value(v[key]), r.metrics[c], r.path.name) for r, v in zip(runs, varied)
                   if key in v and r.metrics.get(c) is not None]
            if pts:
                points_by_metric.append(plots.param_plot(c.replace("interp/", ""), key, pts))
        if points_by_metric:
            plot_html += (f'<div class="plotgroup"><h3>against {esc(key)}</h3><div class="plots">'
                          + "".join(points_by_metric) + "</div></div>")
    if plot_html:
        sections.append(("params", "Metrics against hyper-parameters", plot_html))

    summary = sweep / "sweep_summary.json"
    comparison = sweep / "comparison" / "comparison.csv"
    files = [f'<li><a href="{esc(p.relative_to(sweep).as_posix())}">{esc(p.relative_to(sweep).as_posix())}</a>'
             f'</li>' for p in (summary, comparison) if p.is_file()]
    if files:
        sections.append(("files", "Files", f"<ul>{''.join(files)}</ul>"))
    subtitle = f"{len(runs)} job(s) · {esc(sweep.name)}"
    footer = (f"Written {time.strftime('%Y-%m-%d %H:%M:%S')}; rebuild with "
              f"<code>python report.py {esc(sweep)}</code>.")
    path = sweep / REPORT
    tmp = path.with_name(f".{REPORT}.{os.getpid()}.tmp")
    tmp.write_text(page(f"Sweep report: {sweep.name}", subtitle, sections, footer), encoding="utf-8")
    tmp.replace(path)
    return path


def build(folder: Path, rebuild_jobs: bool = False) -> Path:
    """The page of a run folder, or of a folder of runs (a sweep)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise compare.CompareError(f"{folder} is not a folder: pass a run folder (holding metrics.json) or a sweep "
                                   f"folder (holding job folders)")
    if is_run(folder):
        return build_run_report(folder)[0]
    return build_sweep_report(folder, rebuild_jobs)


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover
    _HydraCallback = object


class SweepReport(_HydraCallback):
    """Hydra callback: the sweep's page after the last job (never fails the sweep)."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep = Path(config.hydra.sweep.dir)
        try:
            path = build_sweep_report(sweep)
            log.info("report: %s", path)
        except Exception as err:  # noqa: BLE001 - the jobs' own results and pages are complete without it
            log.error("report: no sweep page for %s (%s: %s); build it with python report.py %s", sweep,
                      type(err).__name__, err, sweep)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="a run folder or a sweep folder")
    parser.add_argument("--jobs", action="store_true", help="sweep: rebuild every job's page too")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.perf_counter()
    try:
        path = build(args.folder, args.jobs)
    except compare.CompareError as err:
        print(f"report.py: error: {err}", file=sys.stderr)
        return 1
    print(f"report: {path} ({time.perf_counter() - started:.1f} s, {path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
