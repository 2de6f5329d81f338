"""The synthetic consolidation experiment, end to end, one command (from the repository root):

    .venv/bin/python experiments/synthetic/run.py                   # seeds 0, 1, 2: 1-2 min a seed on 2 cores
    .venv/bin/python experiments/synthetic/run.py --seeds 0         # one seed
    .venv/bin/python experiments/synthetic/run.py --run-dir runs/x train.online_teachers=true

For each seed N it builds the toy world (toy.py: tiny base, two experts, data) under
<run-dir>/seed-N/models/, then runs the plain recipe next to this file through the ordinary CLI,
`python -m distill run experiments/synthetic/recipe.yaml run_dir=<run-dir>/seed-N seed=N [overrides]`.
Last it prints each seed's base / uniform weight average / expert / student on both skills with
the student's retention, and the mean over seeds, and writes them to <run-dir>/summary.md and
summary.json. Torch's threads are left at their default. Exit status 1 when a seed misses the
bar: each expert beats the base by >= 0.3 on its own skill, and the student keeps >= 90% of it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path[:0] = [str(ROOT)]  # this checkout's distill and experiments, as the bench scripts do

from experiments.synthetic.toy import ToyConfig, prepare  # noqa: E402

RECIPE = HERE / "recipe.yaml"
MIN_GAIN, MIN_RETENTION = 0.3, 0.9


def distill(stage: str, run_dir: Path, seed: int, overrides: list[str], **kw) -> subprocess.CompletedProcess:
    """`python -m distill STAGE recipe.yaml run_dir=... seed=... overrides` (cwd: this checkout's distill)."""
    cmd = [sys.executable, "-m", "distill", stage, str(RECIPE), f"run_dir={run_dir}", f"seed={seed}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, **kw)


def run_seed(run_dir: Path, seed: int, overrides: list[str]) -> dict:
    """Build the toy world for `seed`, `distill run` the recipe on it; returns its report.json."""
    prepare(run_dir / "models", ToyConfig(), seed)
    print(f"synthetic: distill run {RECIPE.relative_to(ROOT)} run_dir={run_dir} seed={seed} {' '.join(overrides)}",
          flush=True)
    if distill("run", run_dir, seed, overrides).returncode:
        raise SystemExit(f"synthetic: distill run failed for seed {seed}")
    return json.loads((run_dir / "report.json").read_text())


def seed_row(report: dict) -> dict:
    """{task: {base, uniform_avg, expert, student, retention}} from one seed's report."""
    scores = report["scores"]
    return {r["task"]: {"expert_name": expert, "base": r["base"], "uniform_avg": scores["uniform_avg"][r["task"]],
                        "expert": r["teacher"], "student": r["student"], "retention": r["retention"]}
            for expert, r in report["retention"].items()}


def misses(row: dict) -> list[str]:
    """What a seed's result misses of the bar (empty: it holds)."""
    out = []
    for task, c in row.items():
        if c["expert"] < c["base"] + MIN_GAIN:
            out.append(f"{c['expert_name']} {c['expert']:.3f} on {task} is not >= base {c['base']:.3f} + {MIN_GAIN}")
        if c["retention"] is None or c["retention"] < MIN_RETENTION:
            out.append(f"student keeps {_fmt(c['retention'], 'retention')} of {c['expert_name']} on {task}, "
                       f"not >= {100 * MIN_RETENTION:.0f}%")
    return out


def _fmt(v: float | None, col: str) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}%" if col == "retention" else f"{v:.3f}"


def summary_table(rows: dict[int, dict]) -> str:
    """One line per seed and their mean: per skill base, uniform_avg, expert, student, retention."""
    keys = [(t, c) for t in next(iter(rows.values())) for c in ("base", "uniform_avg", "expert", "student", "retention")]
    lines = ["| seed | " + " | ".join(f"{t}: {c}" for t, c in keys) + " |", "|" + "---|" * (1 + len(keys))]
    for seed, row in rows.items():
        lines.append(f"| {seed} | " + " | ".join(_fmt(row[t][c], c) for t, c in keys) + " |")
    means = []
    for t, c in keys:
        vals = [r[t][c] for r in rows.values()]
        means.append(_fmt(None if None in vals else sum(vals) / len(vals), c))
    lines.append("| mean | " + " | ".join(means) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--run-dir", default="runs/synthetic", type=Path, help="one seed-N/ folder per seed in here")
    p.add_argument("overrides", nargs="*", help="recipe overrides (key.sub=value), passed to distill run")
    args = p.parse_args(argv)
    run_dir, seeds = args.run_dir.resolve(), [int(s) for s in args.seeds.split(",")]
    # A bad override fails here in seconds, not after the first toy world is built.
    check = distill("validate", run_dir / f"seed-{seeds[0]}", seeds[0], args.overrides, capture_output=True, text=True)
    if check.returncode:
        sys.stderr.write(check.stderr)
        return check.returncode
    rows, times, failed = {}, {}, {}
    for seed in seeds:
        start = time.time()
        rows[seed] = seed_row(run_seed(run_dir / f"seed-{seed}", seed, args.overrides))
        times[seed] = round(time.time() - start, 1)
        failed[seed] = misses(rows[seed])
    table = summary_table(rows)
    verdict = [f"seed {s}: {'; '.join(m) if m else 'holds'} ({times[s]:.0f} s)" for s, m in failed.items()]
    bar = f"bar: each expert >= base + {MIN_GAIN} on its skill, student >= {100 * MIN_RETENTION:.0f}% of it"
    text = f"{table}\n\n{bar}\n" + "\n".join(verdict) + "\n"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.md").write_text(text)
    (run_dir / "summary.json").write_text(json.dumps({"seeds": rows, "seconds": times, "misses": failed}, indent=1))
    print(f"\nsynthetic consolidation, {len(seeds)} seed(s) ({run_dir / 'summary.md'}):\n\n{text}")
    return 1 if any(failed.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
