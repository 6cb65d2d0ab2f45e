"""Compare runs: accuracy, dissection and concept-composability results of sweep jobs or single runs side by side.

    python compare.py outputs/train/multiruns/2026-11-25_21-00-00_000000            # one sweep
    python compare.py <sweep A> <run B> --out comparisons/ab --metrics 'val/*' 'interp/*'
    python compare.py --wandb <entity>/<project> [--group <sweep folder name>]      # online runs (optional)

Reads each run folder's metrics.json ("metrics": flat name -> value; "interp_errors": the interpretation callbacks
that failed), its overrides (.hydra/overrides.yaml, else metrics.json "overrides") and the latest
<run>/interp/composability/epoch_*/composability.json (algorithms.composition_result.CompositionResult); writes into a
NEW folder (default <first input>/comparison): comparison.csv (one row per run), comparison.png (bars per metric per
run), compositions.csv/.md (per class, each run's "class = concept A 41% + concept B 30% + ..."). Never writes into a
run's own files. Runs missing a metric keep their row with the value missing. Exit status 1 when nothing can be
compared.
"""
from __future__ import annotations

import argparse
import csv
import fnmatch
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Columns shown by default, in this order (glob patterns over metrics.json names; the first match fixes the place).
DEFAULT_METRICS = (
    "test/acc",
    "val/acc",
    "interp/dissection/interpretable_units",
    "interp/dissection/unique_concepts",
    "interp/composability/completeness",
    "interp/composability/concept_coverage",
    "interp/composability/sparsity*",
    "interp/composability/nonzero_weights_per_class",
    "interp/composability/*precision*",
    "interp/composability/*recall*",
)
# folders below a run that never hold runs (skipped when searching an input for runs)
NOT_RUNS = {"wandb", "checkpoints", "interp", "csv", ".hydra", ".submitit", "comparison"}
OUTPUT_MARKER = ".compare-output"


class CompareError(Exception):
    """Nothing can be compared; the message says why and what to pass instead."""


@dataclass
class Run:
    name: str
    path: Path
    status: str = "unknown"
    error: str | None = None
    overrides: list[str] = field(default_factory=list)
    dataset: str = "?"
    model: str = "?"
    metrics: dict[str, float | None] = field(default_factory=dict)
    compositions: dict[str, str] = field(default_factory=dict)  # class -> "concept A 41% + concept B 30%"
    composition_epoch: int | None = None
    interp_errors: list[str] = field(default_factory=list)      # "callback@epoch: error"

    @property
    def readable(self) -> bool:
        return self.status not in ("unreadable", "missing")


# ----------------------------------------------------------------------------------------------------------- reading
def find_run_dirs(root: Path) -> list[Path]:
    """Run folders (holding metrics.json, or Hydra's .hydra/ of a job that died before writing one) below root."""
    if (root / "metrics.json").exists() or (root / ".hydra").is_dir() and (root / "config.yaml").exists():
        return [root]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in NOT_RUNS and not d.startswith("comparison"))
        here = Path(dirpath)
        if "metrics.json" in filenames or (here != root and ".hydra" in os.listdir(here)):
            found.append(here)
            dirnames[:] = []  # a run folder holds no further runs
    return sorted(found, key=_natural_key)


def _natural_key(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def read_run(path: Path, name: str) -> Run:
    run = Run(name=name, path=path)
    metrics_file = path / "metrics.json"
    payload: dict[str, Any] = {}
    if not metrics_file.exists():
        run.status, run.error = "missing", "no metrics.json (the job died before writing it, or is still running)"
    else:
        try:
            payload = json.loads(metrics_file.read_text())
            if not isinstance(payload, dict) or not isinstance(payload.get("metrics", {}), dict):
                raise ValueError('expected {"status": ..., "metrics": {name: value}}')
        except (json.JSONDecodeError, ValueError, UnicodeDecodeError) as err:
            run.status, run.error = "unreadable", f"corrupt metrics.json ({err})"
            payload = {}
        else:
            run.status = str(payload.get("status", "unknown"))
            run.error = payload.get("error")
            run.metrics = {k: _as_float(v) for k, v in (payload.get("metrics") or {}).items()}
            run.interp_errors = read_interp_errors(payload)
    run.overrides = read_overrides(path, payload)
    run.dataset, run.model = read_identity(path, payload)
    run.composition_epoch, run.compositions = read_compositions(path)
    return run


def _as_float(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def read_overrides(path: Path, payload: dict) -> list[str]:
    file = path / ".hydra" / "overrides.yaml"
    if file.is_file():
        try:
            from omegaconf import OmegaConf
            return [str(o) for o in OmegaConf.load(file)]
        except Exception:  # noqa: BLE001 - fall back to metrics.json
            pass
    return [str(o) for o in payload.get("overrides") or []]


def read_identity(path: Path, payload: dict) -> tuple[str, str]:
    """(data set, model): Hydra's group choices when recorded, else the classes' names."""
    choices = payload.get("choices") or {}
    dataset, model = choices.get("datamodule"), choices.get("model")
    config = None
    if not (dataset and model):
        for file in (path / "config.yaml", path / ".hydra" / "config.yaml"):
            if file.is_file():
                try:
                    from omegaconf import OmegaConf
                    config = OmegaConf.load(file)
                    break
                except Exception:  # noqa: BLE001
                    continue
    def target(key: str) -> str | None:
        value = payload.get(key)
        if not value and config is not None:
            value = (config.get(key) or {}).get("_target_")
        return str(value).rsplit(".", 1)[-1] if value else None
    return dataset or target("datamodule") or "?", model or target("model") or "?"


def latest_epoch_dir(folder: Path, holding: str | None = None) -> tuple[int | None, Path | None]:
    """The epoch_NNN folder with the highest epoch (that holds the file `holding`)."""
    best = (None, None)
    if folder.is_dir():
        for d in folder.iterdir():
            m = re.fullmatch(r"epoch_(\d+)", d.name)
            if holding and not (d / holding).is_file():
                continue
            if m and d.is_dir() and (best[0] is None or int(m.group(1)) > best[0]):
                best = (int(m.group(1)), d)
    return best


def read_interp_errors(payload: dict) -> list[str]:
    """metrics.json "interp_errors" (callback, epoch, error, traceback) as "callback@epoch: error"."""
    out = []
    for e in payload.get("interp_errors") or []:
        if isinstance(e, dict):
            out.append(f"{e.get('callback', '?')}@{e.get('epoch', '?')}: {e.get('error', '?')}")
    return out


def read_compositions(path: Path) -> tuple[int | None, dict[str, str]]:
    """Per class composition text from the latest <run>/interp/composability/epoch_*/composability.json."""
    epoch, folder = latest_epoch_dir(path / "interp" / "composability", "composability.json")
    if folder is None:
        return None, {}
    from algorithms.composition_result import CompositionResult
    from core.results import SchemaError
    try:
        result = CompositionResult.load(folder / "composability.json")
    except SchemaError as err:
        print(f"warning: {err}", file=sys.stderr)
        return epoch, {}
    return epoch, dict(result.compositions())


def gather(inputs: list[Path]) -> list[Run]:
    runs: list[Run] = []
    for root in inputs:
        if not root.exists():
            raise CompareError(f"{root} does not exist; pass sweep folders (outputs/train/multiruns/<time>) or run "
                               f"folders (holding metrics.json)")
        dirs = find_run_dirs(root)
        if not dirs:
            print(f"warning: {root} holds no runs (no metrics.json below it)", file=sys.stderr)
        for d in dirs:
            rel = d.relative_to(root).as_posix() if d != root else ""
            name = f"{root.name}/{rel}" if rel else root.name
            runs.append(read_run(d, name))
    if not runs:
        raise CompareError("no runs found in " + ", ".join(map(str, inputs)) +
                           ": a run folder holds metrics.json (written by train.py); a sweep folder holds job folders")
    if not any(r.readable for r in runs):
        raise CompareError("no run has a readable metrics.json: " +
                           "; ".join(f"{r.path}: {r.error}" for r in runs))
    return runs


def from_wandb(project: str, group: str | None) -> list[Run]:
    """Runs of a W&B project (online only): summary metrics and the overrides from each run's config."""
    try:
        import wandb
        api = wandb.Api(timeout=30)
        filters = {"group": group} if group else None
        wandb_runs = list(api.runs(project, filters=filters))
    except Exception as err:  # noqa: BLE001 - no network, no credentials, unknown project
        raise CompareError(f"cannot read W&B project {project!r}: {err}. Offline runs are not visible to the W&B "
                           f"API: compare their folders instead (or upload them with `wandb sync`).") from err
    runs = []
    for wr in wandb_runs:
        summary = {k: _as_float(v) for k, v in dict(wr.summary).items() if _as_float(v) is not None}
        config = dict(wr.config)
        run = Run(name=f"{wr.group or ''}/{wr.name}".strip("/"), path=Path(wr.url or wr.id), status=str(wr.state),
                  metrics=summary, overrides=[f"{k}={v}" for k, v in sorted(config.items())
                                              if not isinstance(v, dict)][:12])
        runs.append(run)
    if not runs:
        raise CompareError(f"W&B project {project!r} has no runs" + (f" in group {group!r}" if group else ""))
    return runs


# -------------------------------------------------------------------------------------------------------- table
def metric_columns(runs: list[Run], patterns: list[str]) -> list[str]:
    names = sorted({k for r in runs for k in r.metrics})
    cols: list[str] = []
    for pattern in patterns:
        cols += [n for n in names if fnmatch.fnmatchcase(n, pattern) and n not in cols]
    return cols


def varying_overrides(runs: list[Run]) -> list[list[str]]:
    """Per run, the overrides that differ between the runs (what the sweep varied); all of them for a single run."""
    keyed = [dict(o.split("=", 1) if "=" in o else (o, "") for o in r.overrides) for r in runs]
    keys = sorted({k for d in keyed for k in d})
    varying = [k for k in keys if len({d.get(k) for d in keyed}) > 1] if len(runs) > 1 else keys
    return [[f"{k}={d[k]}" for k in varying if k in d] for d in keyed]


def group_resumed(runs: list[Run]) -> list[Run]:
    """Runs continued in another folder (`ckpt_path=<earlier run>/checkpoints/last.ckpt`) sit next to the run they
    continue: they share metrics.json "run_id", and "resumed_from" names the earlier folder (a run killed before it
    wrote metrics.json is found that way). The earlier runs are marked as continued, and all of a lineage take the
    data set and model recorded by its latest run, so a killed run is never read as another data set (its checkpoint
    was checked to match when the resume started)."""
    def record(run: Run) -> dict:
        try:
            payload = json.loads((run.path / "metrics.json").read_text())
            return payload if isinstance(payload, dict) else {}
        except (OSError, ValueError):
            return {}

    info = {id(r): record(r) for r in runs}
    by_path = {r.path.resolve(): r for r in runs}
    lineage = {id(r): info[id(r)].get("run_id") or str(r.path.resolve()) for r in runs}
    for r in runs:  # follow "resumed_from" to an earlier folder among the inputs
        earlier_dir = (info[id(r)].get("resumed_from") or {}).get("run_dir")
        earlier = by_path.get(Path(earlier_dir).resolve()) if earlier_dir else None
        if earlier is not None and earlier is not r:
            old, new = lineage[id(earlier)], lineage[id(r)]
            lineage = {k: (new if v == old else v) for k, v in lineage.items()}
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(lineage[id(r)], []).append(r)
    ordered: list[Run] = []
    for members in groups.values():
        members.sort(key=lambda r: str(info[id(r)].get("started") or ""))
        latest = members[-1]
        for r in members[:-1]:
            r.status = f"{r.status}, resumed in {latest.name}"
            r.dataset, r.model = latest.dataset, latest.model
        if len(members) > 1:
            print(f"note: {' -> '.join(r.name for r in members)} are one run (id "
                  f"{info[id(latest)].get('run_id') or '?'}), resumed from its checkpoint", file=sys.stderr)
        ordered += members
    return ordered


def group_by_dataset(runs: list[Run]) -> dict[str, list[Run]]:
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.dataset, []).append(r)
    return groups


def fmt(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.4f}" if abs(value) < 1000 and value != int(value) else f"{value:g}"


# -------------------------------------------------------------------------------------------------------- output
def prepare_out_dir(out: Path, run_dirs: list[Path]) -> Path:
    """A folder of compare.py's own: never a run folder, never an existing folder that compare.py did not create."""
    out = out.resolve()
    for rd in run_dirs:
        rd = rd.resolve()
        if out == rd or rd in out.parents and out.relative_to(rd).parts[0] in NOT_RUNS:
            raise CompareError(f"--out {out} would write into the run folder {rd}; choose another folder")
    if (out / "metrics.json").exists():
        raise CompareError(f"--out {out} is a run folder (it holds metrics.json); choose another folder")
    if out.exists() and any(out.iterdir()) and not (out / OUTPUT_MARKER).exists():
        raise CompareError(f"--out {out} exists and was not written by compare.py; choose a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / OUTPUT_MARKER).write_text("written by compare.py; safe to delete\n")
    return out


def write_csv(path: Path, runs: list[Run], cols: list[str], labels: list[list[str]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "dataset", "model", "status", "overrides", "varying", *cols, "error", "interp_errors",
                    "path"])
        for r, lab in zip(runs, labels):
            w.writerow([r.name, r.dataset, r.model, r.status, " ".join(r.overrides), " ".join(lab),
                        *["" if r.metrics.get(c) is None else repr(r.metrics[c]) for c in cols],
                        r.error or "", "; ".join(r.interp_errors), str(r.path)])


def composition_table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    classes = []
    for r in runs:
        classes += [c for c in r.compositions if c not in classes]
    return classes, [[r.compositions.get(c, "") for r in runs] for c in classes]


def write_compositions(out: Path, runs: list[Run], labels: list[list[str]]) -> None:
    classes, rows = composition_table(runs)
    if not classes:
        return
    with (out / "compositions.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", *[r.name for r in runs]])
        for cls, row in zip(classes, rows):
            w.writerow([cls, *row])
    lines = ["# Class compositions (latest composability epoch of each run)", ""]
    for r, lab in zip(runs, labels):
        lines.append(f"- **{r.name}** ({' '.join(lab) or r.model}): epoch {r.composition_epoch}")
    for cls, row in zip(classes, rows):
        lines += ["", f"## {cls}", ""]
        lines += [f"- {r.name}: {cls} = {text}" if text else f"- {r.name}: (missing)" for r, text in zip(runs, row)]
    (out / "compositions.md").write_text("\n".join(lines) + "\n")


def plot(path: Path, runs: list[Run], cols: list[str], labels: list[list[str]], title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [c for c in cols if any(r.metrics.get(c) is not None for r in runs)] or cols[:1]
    n = max(1, len(cols))
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    key = [f"{r.name}: {short(' '.join(lab)) or r.model}" for r, lab in zip(runs, labels)]
    fig_h = 0.3 * len(runs) * nrows + 1.2 * nrows + 0.18 * len(key) + 0.8
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols + 1.4, fig_h), squeeze=False)
    colors = plt.get_cmap("tab10")
    ys = list(range(len(runs)))
    for i, (ax, col) in enumerate(zip(axes.flat, cols)):
        values = [r.metrics.get(col) for r in runs]
        ax.barh(ys, [v if v is not None else 0.0 for v in values], color=[colors(j % 10) for j in ys], alpha=0.85)
        for y, v in zip(ys, values):
            ax.text(0, y, f" {fmt(v)}" if v is not None else " missing", va="center", fontsize=7,
                    color="black" if v is not None else "crimson")
        ticks = [short(" ".join(lab), 32) or r.name for r, lab in zip(runs, labels)]
        ax.set_yticks(ys, ticks if i % ncols == 0 else [""] * len(runs), fontsize=7)
        ax.invert_yaxis()
        ax.set_title(col, fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    for ax in list(axes.flat)[len(cols):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    # which run is which: the overrides the runs differ in, below the bars
    bottom = (0.18 * len(key) + 0.5) / fig_h
    fig.text(0.01, 0.01, "\n".join(key), fontsize=6.5, va="bottom", family="monospace")
    fig.tight_layout(rect=(0, bottom, 1, 0.97))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def short(text: str, width: int = 110) -> str:
    # long float overrides (Optuna samples) at 4 significant digits
    text = re.sub(r"(=)(-?\d+\.\d{5,}(?:e-?\d+)?)", lambda m: m.group(1) + f"{float(m.group(2)):.4g}", text)
    return text if len(text) <= width else text[: width - 1] + "…"


def print_report(runs: list[Run], cols: list[str], labels: list[list[str]], title: str) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    def cell(r: Run, c: str) -> str:
        return fmt(r.metrics.get(c)) if r.metrics.get(c) is not None else "[dim]missing[/dim]"

    def status(r: Run) -> str:
        return r.status if r.status == "completed" else f"[red]{r.status}[/red]"

    if len(runs) <= 8:  # few runs: one column per run, one row per metric (long metric names stay readable)
        console = Console(width=max(100, min(240, 48 + 34 * len(runs))))
        table = Table(title=title)
        table.add_column("")
        for r, lab in zip(runs, labels):
            table.add_column(f"{r.name}\n{' '.join(lab)}".strip(), overflow="fold")
        table.add_row("status", *[status(r) for r in runs], end_section=not any(r.interp_errors for r in runs))
        if any(r.interp_errors for r in runs):
            table.add_row("interp errors", *[f"[yellow]{len(r.interp_errors)}[/yellow]" if r.interp_errors else "0"
                                             for r in runs], end_section=True)
        for c in cols:
            table.add_row(c.replace("interp/", ""), *[cell(r, c) for r in runs])
    else:
        console = Console(width=max(100, min(240, 40 + 14 * len(cols))))
        table = Table(title=title)
        for head in ("run", "varied", "status", *cols):
            table.add_column(head.replace("interp/", ""), overflow="fold")
        for r, lab in zip(runs, labels):
            table.add_row(r.name, " ".join(lab), status(r), *[cell(r, c) for c in cols])
    console.print(table)
    classes, rows = composition_table(runs)
    if classes:
        comp = Table(title="class compositions (latest composability epoch)", show_lines=True)
        comp.add_column("class")
        for r, lab in zip(runs, labels):
            comp.add_column(f"{r.name}\n{' '.join(lab)}".strip(), overflow="fold")
        for cls, row in zip(classes, rows):
            comp.add_row(cls, *[text or "[dim]missing[/dim]" for text in row])
        console.print(comp)
    for r in runs:
        if r.error:
            console.print(f"[red]{r.name}[/red]: {r.error}")
        for e in r.interp_errors:
            console.print(f"[yellow]{escape(r.name)}[/yellow]: interpretation callback failed (the run went on "
                          f"without it): {escape(e)}")


def compare(inputs: list[Path], out: Path | None = None, metrics: list[str] | None = None,
            wandb_project: str | None = None, wandb_group: str | None = None, quiet: bool = False) -> Path:
    """Build the comparison; returns the output folder. Raises CompareError when nothing can be compared."""
    runs = from_wandb(wandb_project, wandb_group) if wandb_project else group_resumed(gather(inputs))
    if out is None:
        if not inputs:
            raise CompareError("--out is required with --wandb")
        out = inputs[0] / "comparison"
    out = prepare_out_dir(out, [] if wandb_project else [r.path for r in runs])
    patterns = list(metrics or DEFAULT_METRICS)
    groups = group_by_dataset(runs)
    if len(groups) > 1:
        print("warning: the runs use different data sets (" + ", ".join(f"{d}: {len(g)} run(s)"
              for d, g in groups.items()) + "); their metrics are not comparable, so they are grouped by data set",
              file=sys.stderr)
    all_cols = metric_columns(runs, patterns)
    if not all_cols:
        print(f"warning: no metric matches {patterns}; metrics seen: "
              f"{sorted({k for r in runs for k in r.metrics})[:20]}", file=sys.stderr)
    # what distinguishes the runs, within their data set's group
    by_run = {id(r): lab for group in groups.values() for r, lab in zip(group, varying_overrides(group))}
    labels = [by_run[id(r)] for r in runs]
    write_csv(out / "comparison.csv", runs, all_cols, labels)
    write_compositions(out, runs, labels)
    for dataset, group in groups.items():
        cols = metric_columns(group, patterns)
        suffix = "" if len(groups) == 1 else "_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset)
        title = f"data set {dataset}: {len(group)} run(s)"
        plot(out / f"comparison{suffix}.png", group, cols, [by_run[id(r)] for r in group], title)
        if not quiet:
            print_report(group, cols, [by_run[id(r)] for r in group], title)
    if not quiet:
        print(f"comparison written to {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", type=Path, help="sweep folders and/or run folders")
    parser.add_argument("--out", type=Path, help="output folder (default <first input>/comparison)")
    parser.add_argument("--metrics", nargs="+", help="metric name patterns (globs), in column order; default: "
                        + " ".join(DEFAULT_METRICS))
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read runs from W&B instead (online only)")
    parser.add_argument("--group", help="with --wandb: only this group (a sweep folder's name)")
    args = parser.parse_args(argv)
    if not args.inputs and not args.wandb:
        parser.error("pass at least one sweep or run folder (or --wandb ENTITY/PROJECT --out DIR)")
    try:
        compare(args.inputs, args.out, args.metrics, args.wandb, args.group)
    except CompareError as err:
        print(f"compare.py: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
