"""Run every benchmarks/bench_*.py, each in its own process, and print one table of their results (`make bench`).

Each benchmark ends with one line `RESULT <name> ratio=<median> spread=<min>-<max> vs=<what it is compared with>
key=value ... load=<load average>` (benchmarks/common.py `result`): the ratio of the project's time to what it is
compared with, both measured interleaved in the same run. The table shows per benchmark the ratio, its spread, what
it is compared with, its other figures, its wall time and the 1-minute load average when it ended. The exit status
is 1 when a benchmark failed or printed no RESULT line. Each benchmark's whole output goes to
outputs/bench/<script>.log.

    python benchmarks/run_all.py [--quick] [--only dissection push ...] [--skip callback_overhead ...]

--quick passes small sizes (QUICK_ARGS) and leaves out the benchmarks that train models (QUICK_SKIP).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: small sizes for --quick (same comparisons, fewer images / rounds)
QUICK_ARGS = {
    "capsnet": ["--repeats", "3", "--steps", "1"],
    "decision_tree": ["--repeats", "3"],
    "dissection": ["--images", "60", "--repeats", "2"],
    "dynconn": ["--repeat", "5"],
    "featviz": ["--steps", "2", "--repeats", "2"],
    "gan_dissection": ["--samples", "128", "--repeats", "3"],
    "gradcam": ["--batch", "8", "--repeats", "3"],
    "last_layer": ["--images", "120", "--rounds", "2"],
    "push": ["--images", "1500", "--repeats", "2"],
    # 3 timed pairs of 10-batch epochs (the whole 6000-image split takes ~1.5 min per epoch on a loaded machine)
    "train_throughput": ["--pairs", "3", "--batches", "10"],
    "memory_format": ["--pairs", "3", "--batches", "10"],
}
#: left out by --quick: trains models for many minutes
QUICK_SKIP = {"callback_overhead"}
#: what the ratio is compared with, for RESULT lines without a `vs` field
DEFAULT_VS = {"train_throughput": "plain PyTorch loop (framework / plain)",
              "callback_overhead": "callbacks=minimal run"}


def parse_result(line: str) -> dict[str, str] | None:
    """`RESULT name k=v ...` -> {"name": name, k: v, ...} (fields in their order); None for any other line."""
    parts = line.strip().split()
    if len(parts) < 2 or parts[0] != "RESULT":
        return None
    fields = {"name": parts[1]}
    for part in parts[2:]:
        key, sep, value = part.partition("=")
        if sep:
            fields[key] = value
    return fields


def last_result(output: str) -> dict[str, str] | None:
    found = None
    for line in output.splitlines():
        found = parse_result(line) or found
    return found


COLUMNS = ("benchmark", "ratio", "spread", "compared with", "other figures", "seconds", "load")


def table_rows(runs: list[dict]) -> list[list[str]]:
    """One row per run: {"name", "result" (parsed RESULT fields or None), "returncode", "seconds", "load"}."""
    rows = []
    for run in runs:
        res = run.get("result")
        seconds = f"{run['seconds']:.0f}" if run.get("seconds") is not None else ""
        if run.get("skipped"):
            rows.append([run["name"], "skipped", "", run["skipped"], "", "", ""])
            continue
        if run.get("returncode", 0) != 0 or res is None:
            why = f"FAILED (exit {run['returncode']})" if run.get("returncode", 0) != 0 else "no RESULT line"
            rows.append([run["name"], why, "", "", "", seconds, f"{run.get('load', 0.0):.1f}"])
            continue
        keys = [k for k in res if k not in ("name", "spread", "vs", "load")]
        main = "ratio" if "ratio" in res else (keys[0] if keys else "")
        vs = res.get("vs", DEFAULT_VS.get(res["name"], "")).replace("_", " ")
        others = " ".join(f"{k}={res[k]}" for k in keys if k != main)
        load = res.get("load", f"{run.get('load', 0.0):.1f}")
        rows.append([res["name"], res.get(main, ""), res.get("spread", ""), vs, others, seconds, load])
    return rows


def render_plain(rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(COLUMNS, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(COLUMNS), line("-" * w for w in widths)] + [line(r) for r in rows])


def render_markdown(rows: list[list[str]]) -> str:
    cells = lambda row: "| " + " | ".join(str(c).replace("|", "/") for c in row) + " |"  # noqa: E731
    return "\n".join([cells(COLUMNS), cells("---" for _ in COLUMNS)] + [cells(r) for r in rows])


def render(rows: list[list[str]], markdown: bool = False) -> str:
    """The table as text: markdown, rich's when rich is installed, plain columns otherwise."""
    if markdown:
        return render_markdown(rows)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        return render_plain(rows)
    table = Table()
    for name in COLUMNS:
        table.add_column(name, overflow="fold", justify="right" if name in ("ratio", "seconds", "load") else "left")
    for row in rows:
        table.add_row(*row)
    console = Console(width=200, color_system=None)
    with console.capture() as capture:
        console.print(table)
    return capture.get().rstrip()


def scripts() -> dict[str, Path]:
    return {p.stem.removeprefix("bench_"): p for p in sorted(HERE.glob("bench_*.py"))}


def run_one(name: str, script: Path, args: list[str], log_dir: Path, timeout: float | None) -> dict:
    log = log_dir / f"{script.stem}.log"
    cmd = [sys.executable, str(script), *args]
    print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    try:
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                             env=dict(os.environ, PROJECT_ROOT=str(ROOT)))
        output, code = out.stdout + out.stderr, out.returncode
    except subprocess.TimeoutExpired as err:  # its captured output may be bytes despite text=True
        output = "".join(v.decode(errors="replace") if isinstance(v, bytes) else v
                         for v in (err.stdout, err.stderr) if v)
        output, code = output + f"\ntimed out after {timeout} s", 124
    seconds = time.perf_counter() - start
    log.write_text(output)
    res = last_result(output)
    if code != 0 or res is None:
        tail = "\n".join(output.splitlines()[-15:])
        print(f"   {'failed (exit %d)' % code if code else 'no RESULT line'}; see {log}\n{tail}", flush=True)
    else:
        print(f"   {' '.join(f'{k}={v}' for k, v in res.items())} ({seconds:.0f} s)", flush=True)
    return {"name": name, "result": res, "returncode": code, "seconds": seconds, "load": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes; leaves out " + ", ".join(sorted(QUICK_SKIP)))
    ap.add_argument("--only", nargs="+", default=None, help="benchmark names (bench_<name>.py)")
    ap.add_argument("--skip", nargs="+", default=[])
    ap.add_argument("--timeout", type=float, default=None, help="seconds per benchmark (default: none)")
    ap.add_argument("--log-dir", default=str(ROOT / "outputs" / "bench"))
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown (for docs/)")
    args = ap.parse_args(argv)
    found = scripts()
    unknown = [n for n in (args.only or []) + args.skip if n not in found]
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; known: {', '.join(found)}")
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    start = time.perf_counter()
    runs = []
    for name, script in found.items():
        if args.only is not None and name not in args.only:
            continue
        if name in args.skip or (args.quick and name in QUICK_SKIP and not args.only):
            runs.append({"name": name, "skipped": "--skip" if name in args.skip else "--quick (trains models)"})
            continue
        runs.append(run_one(name, script, QUICK_ARGS.get(name, []) if args.quick else [], log_dir, args.timeout))
    load_after = os.getloadavg()
    title = (f"benchmarks{' --quick' if args.quick else ''}: {time.perf_counter() - start:.0f} s; load average "
             f"{' '.join(f'{v:.2f}' for v in load_before)} before, {' '.join(f'{v:.2f}' for v in load_after)} "
             f"after (1, 5, 15 min); ratio = project / compared with, median of interleaved rounds")
    print(title)
    print(render(table_rows(runs), args.markdown))
    failed = [r["name"] for r in runs if not r.get("skipped") and (r["returncode"] != 0 or r["result"] is None)]
    if failed:
        print(f"failed: {', '.join(failed)} (logs in {log_dir})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
