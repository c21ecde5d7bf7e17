"""Every benchmark in one run: `python bench/run.py [--quick] [--only NAME ...] [--readme]`.

Runs each `bench/bench_*.py` in its own process (so one's memory never counts toward
another's), records its wall time and peak resident memory, keeps its JSON in bench/results/,
and writes bench/results/summary.md: one table of the headline figures, each with the command
and machine that produced it. `--readme` also replaces the block between the
`<!-- bench:start -->` and `<!-- bench:end -->` markers of README.md with that table.

--quick sizes every benchmark for minutes in total (tiny phantoms and models): it shows that the
suite runs and what it reports, not the figures to quote.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import run_child  # noqa: E402

RESULTS = HERE / "results"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def _get(d: dict, path: str, default=None):
    for key in path.split("."):
        if not isinstance(d, dict) or key not in d:
            return default
        d = d[key]
    return d


def _fmt(v, spec: str = ".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def _io(d: dict) -> list[tuple[str, str]]:
    r = d.get("ratios", {})
    return [
        (
            "DICOM reading, lsdc vs bare pydicom (time ratio, 1 / N workers)",
            f"{_fmt(r.get('lsdc_vs_bare_1_worker'), '.2f')}x / "
            f"{_fmt(r.get('lsdc_vs_bare_n_workers'), '.2f')}x",
        )
    ]


def _synth(d: dict) -> list[tuple[str, str]]:
    return [
        (
            f"phantom generation at {r['size']} px (studies/min, 1 / 2 workers)",
            f"{r['studies_per_min_1_worker']} / {r['studies_per_min_2_workers']}",
        )
        for r in d.get("results", [])
    ]


def _preprocess(d: dict) -> list[tuple[str, str]]:
    acc = _get(d, "slice_relevance.accuracy", {})
    rows = [
        (
            f"slice relevance {k.split('|')[0]}, ensemble exact / within 1",
            f"{v['exact']:.3f} / {v['within1']:.3f}",
        )
        for k, v in acc.items()
        if k.endswith("|ensemble")
    ]
    ratio = _get(d, "throughput.ratio_multitask_over_read")
    rows.append(
        ("multitask preprocessing speed / reading the same files", f"{_fmt(ratio, '.2f')}x")
    )
    for r in _get(d, "scaling.runs") or []:  # with --scaling
        rows.append(
            (
                f"multitask preprocessing, {r['executor']} x{r['workers']}: studies/s vs 1 local "
                "worker, end to end / steady",
                f"{_fmt(r['studies_per_s_over_local_1'], '.2f')}x / "
                f"{_fmt(r['steady_studies_per_s_over_local_1'], '.2f')}x",
            )
        )
    return rows


def _pipeline(d: dict) -> list[tuple[str, str]]:
    rows = _get(d, "test.rows", {})
    prior = _get(rows, "class prior.score")
    out = []
    for name, row in rows.items():
        gap = row.get("gap_closed")
        extra = f", {gap:.0%} of the gap to the oracle" if gap is not None else ""
        ratio = row["score"] / prior if prior else None
        out.append(
            (f"test score: {name}", f"{row['score']:.4f} ({_fmt(ratio, '.2f')}x prior{extra})")
        )
    for name, score in (d.get("oof") or {}).items():
        out.append((f"OOF score: {name}", f"{score['score']:.4f}"))
    ens = _get(d, "ensemble_oof.ensemble.score")
    if ens is not None:
        out.append(("OOF score: ensemble (cross-fitted)", f"{ens:.4f}"))
    for st, e in (d.get("keypoint_error_mm") or {}).items():
        out.append((f"keypoint error {st}, median / p90 mm", f"{e['median']:.1f} / {e['p90']:.1f}"))
    for name, s in (d.get("inference_seconds_per_study") or {}).items():
        out.append((f"CPU inference s/study: {name}", f"{s:.2f}"))
    out.append(("fit + predict wall time", f"{d.get('wall_seconds', 0) / 60:.1f} min"))
    return out


def _scale(d: dict) -> list[tuple[str, str]]:
    size = _get(d, "config.size")
    rows = [
        (f"{name} at {size} px (per {r['unit']}, peak RSS)",
         f"{r['per_unit_s']:.2f} s, {r['peak_rss_mb']:.0f} MB")
        for name, r in d.get("stages", {}).items()
    ]  # fmt: skip
    for name, v in (_get(d, "extrapolation.scenarios") or {}).items():
        rows.append(
            (
                f"extrapolated to 2,000 studies, 16 cores + 1 GPU ({name}; no GPU measured)",
                f"fit {v['fit_total'] / 3600:.1f} h, predict {v['predict_total'] / 60:.0f} min",
            )
        )
    return rows


def _folds(d: dict) -> list[tuple[str, str]]:
    serial = d.get("one_after_the_other", {})
    return [
        (
            f"multitask training ({d.get('studies')} studies, {d.get('epochs')} epochs), folds side"
            " by side / one after the other, wall time",
            f"{_fmt(d.get('wall_ratio'), '.2f')}x (one process keeps "
            f"{_fmt(serial.get('cores_busy'), '.2f')} cores busy)",
        )
    ]


@dataclass
class Bench:
    name: str
    full: list[str]
    quick: list[str]
    summarise: Callable[[dict], list[tuple[str, str]]]


BENCHES = [
    Bench("io", [], ["--series", "12", "--repeats", "2", "--size", "128"], _io),
    Bench("synth", [], ["--studies", "2", "--sizes", "64"], _synth),
    Bench(
        "preprocess",
        ["--workers", "2"],
        [
            "--train-studies",
            "12",
            "--phantom-size",
            "64",
            "--folds",
            "2",
            "--crop-size",
            "64",
            "--workers",
            "2",
            "--read-repeats",
            "1",
        ],
        _preprocess,
    ),
    Bench("pipeline", [], ["--quick"], _pipeline),
    Bench("scale", [], ["--quick"], _scale),
    Bench("folds", [], ["--train-studies", "12", "--size", "64", "--epochs", "1"], _folds),
]


def run_one(bench: Bench, quick: bool) -> dict:
    """Run a benchmark in a child process -> {status, seconds, peak_rss_mb, command}."""
    script = HERE / f"bench_{bench.name}.py"
    out = f"bench/results/bench_{bench.name}{'_quick' if quick else ''}.json"  # from the root
    args = [*(bench.quick if quick else bench.full), "--out", out]
    child = run_child([sys.executable, str(script), *args], cwd=HERE.parent)
    return {
        "command": "python " + " ".join([f"bench/{script.name}", *args]),
        "status": child.status,
        "seconds": round(child.seconds, 1),
        "peak_rss_mb": child.peak_rss_mb,
        "json": out,
    }


def summary_markdown(runs: dict[str, dict], quick: bool) -> str:
    machine = f"{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    lines = [
        f"Benchmarks{' (--quick: sizes for a smoke run, not figures to quote)' if quick else ''}, "
        f"{time.strftime('%Y-%m-%d')}, on {machine}. Re-run: `python bench/run.py"
        f"{' --quick' if quick else ''}`.",
        "",
        "| benchmark | what | figure | command | peak memory |",
        "| --- | --- | --- | --- | --- |",
    ]
    for bench in BENCHES:
        run = runs.get(bench.name)
        if run is None:
            continue
        path = HERE.parent / run["json"]
        if run["status"] != 0 or not path.exists():
            lines.append(
                f"| {bench.name} | failed (exit {run['status']}) | | `{run['command']}` | |"
            )
            continue
        for what, figure in bench.summarise(json.loads(path.read_text())):
            lines.append(
                f"| {bench.name} | {what} | {figure} | `{run['command']}` | "
                f"{run['peak_rss_mb']:.0f} MB |"
            )
    return "\n".join(lines) + "\n"


def update_readme(readme: Path, table: str) -> None:
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme}: no {START} ... {END} block to replace")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{table}{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", nargs="*", choices=[b.name for b in BENCHES])
    p.add_argument("--readme", action="store_true", help="embed the summary in README.md")
    args = p.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    runs = {}
    for bench in BENCHES:
        if args.only and bench.name not in args.only:
            continue
        print(f"[bench] {bench.name}", flush=True)
        runs[bench.name] = run_one(bench, args.quick)
        print(
            f"[bench] {bench.name}: exit {runs[bench.name]['status']}, "
            f"{runs[bench.name]['seconds']:.0f} s, peak {runs[bench.name]['peak_rss_mb']:.0f} MB",
            flush=True,
        )
    table = summary_markdown(runs, args.quick)
    (RESULTS / f"summary{'_quick' if args.quick else ''}.md").write_text(table)
    (RESULTS / f"run{'_quick' if args.quick else ''}.json").write_text(json.dumps(runs, indent=2))
    if args.readme:
        update_readme(HERE.parent / "README.md", table)
    print(table)
    return 1 if any(r["status"] != 0 for r in runs.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
