"""Print a markdown table comparing bench/results/codemode.json with bench/results/baseline.json.

    python bench/compare.py [--smoke] [--baseline PATH] [--ours PATH]

The last column is how many times better ours is (baseline / ours for times and memory,
ours / baseline for throughput): above 1 means we win. Memory is compared by PSS-sum; RSS-sum
is shown without a ratio, since it counts pages shared between processes once per process.
Standard library only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib


def _load(path: Path) -> dict[str, Any] | None:
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    return doc


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if not isinstance(value, int | float):
        return str(value)
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table(baseline: dict[str, Any] | None, ours: dict[str, Any] | None) -> str:
    base_w = (baseline or {}).get("workloads", {})
    ours_w = (ours or {}).get("workloads", {})
    base_name = (baseline or {}).get("impl", "baseline (missing)")
    ours_name = (ours or {}).get("impl", "ours (missing)")
    lines = [
        f"| workload | unit | {base_name} | {ours_name} | ours vs baseline |",
        "|---|---|--:|--:|--:|",
    ]
    for workload, key, label, unit, higher_is_better in benchlib.METRICS:
        b = base_w.get(workload, {}).get(key)
        o = ours_w.get(workload, {}).get(key)
        ratio = "-"
        if (workload, key) in benchlib.NO_RATIO:
            ratio = "n/a (compare PSS)"
        elif isinstance(b, int | float) and isinstance(o, int | float) and b > 0 and o > 0:
            factor = o / b if higher_is_better else b / o
            ratio = f"{factor:.2f}x {'better' if factor >= 1 else 'worse'}"
        lines.append(f"| {label} | {unit} | {_fmt(b)} | {_fmt(o)} | {ratio} |")
    notes = []
    for doc in (baseline, ours):
        if doc:
            m = doc.get("machine", {})
            notes.append(
                f"{doc.get('impl')}: {doc.get('date')}, {m.get('os', m.get('platform'))}, "
                f"{m.get('cpus')} CPUs, Python {m.get('python')}"
                + (" [smoke sizes]" if doc.get("smoke") else "")
            )
    return "\n".join(lines) + ("\n\n" + "\n".join(f"- {n}" for n in notes) if notes else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="compare the --smoke result files")
    parser.add_argument("--baseline", type=Path)
    parser.add_argument("--ours", type=Path)
    args = parser.parse_args()
    suffix = ".smoke.json" if args.smoke else ".json"
    baseline = _load(args.baseline or benchlib.RESULTS_DIR / f"baseline{suffix}")
    ours = _load(args.ours or benchlib.RESULTS_DIR / f"codemode{suffix}")
    if baseline is None and ours is None:
        print("no results: run bench/run_all.sh first", file=sys.stderr)
        return 1
    print(table(baseline, ours))
    return 0


if __name__ == "__main__":
    sys.exit(main())
