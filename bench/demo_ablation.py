"""Ablations of the demo's merge-initialised student (recipes/demo.yaml), one variant per row.

    python bench/demo_ablation.py                       # every variant below
    python bench/demo_ablation.py --only seed1,t2       # some of them
    python bench/demo_ablation.py --list

Run scripts/demo.sh first: each variant reuses its teacher cache (runs/demo/cache, unless a
variant changes the calibration data, which makes a cache of its own) and the evaluation cache
(base, experts and merges are not scored again). Per variant, through the same CLI users run:

    distill cache recipes/demo.yaml run_dir=runs/ablation/<name> cache.dir=<cache> <overrides>
    distill train recipes/demo.yaml run_dir=runs/ablation/<name> cache.dir=<cache> <overrides>
    distill eval  recipes/demo.yaml run_dir=runs/ablation/<name> eval.models=<base, merges>

The evaluation is the demo's own (same tasks, subsets, protocols); only training settings vary.
Prints one markdown table (and writes runs/ablation/ablation.md): each variant's scores, its
mean over the two skills, its paired difference to the best merge on the mean with the 95%
interval, and the gain it keeps of each expert's gain over the base. "demo" is scripts/demo.sh's
own run (runs/demo), not trained again. Train times are each run's train_result.json wall time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "demo.yaml"
DEMO = ROOT / "runs" / "demo"

MATH480 = "data.sources.0.num_samples=480"
# The demo's student before 2026-12-07: the full model (134M weights), lr 5e-5. Its rows in
# docs/benchmarks.md ("full ...") were run when it was the shipped recipe.
FULL = ["student.lora=null", "train.lr=5.0e-5"]

# name -> overrides of recipes/demo.yaml. "demo" is the recipe as shipped: a rank-32 LoRA student
# whose adapter starts as the SVD fit of the TIES merge, lr 2e-4.
VARIANTS: dict[str, list[str]] = {
    "demo": [],
    "seed1": ["seed=1"],                               # the same recipe, another batch order (train seed)
    "seed2": ["seed=2"],
    "t2": ["loss.temperature=2.0"],                    # softer teacher and student distributions
    "fixed": ["loss.weighting=fixed"],                 # every teacher on every token, not each on its own skill
    "lr1e-4": ["train.lr=1.0e-4"],
    "full": FULL,
    "full_seed1": [*FULL, "seed=1"],
    "full_seed2": [*FULL, "seed=2"],
    "full_lr2e-4": ["student.lora=null", "train.lr=2.0e-4"],  # a larger step: 28 steps may be too few at 5e-5
    "full_epochs3": [*FULL, "train.epochs=3"],         # the same calibration, three passes
    "full_t2": [*FULL, "loss.temperature=2.0"],
    "full_fixed": [*FULL, "loss.weighting=fixed"],
    "full_ce0.5": [*FULL, "loss.ce_weight=0.5"],       # half the loss plain cross-entropy on the data
    "full_ungrouped": [*FULL, "train.group_by_length=false"],  # mixed-skill batches (57% padding)
    "full_from_linear": [*FULL, "student.init.method=linear", "student.init.weights=[0.5,0.5]",
                         "student.init.density=null"],
    # three times the math calibration rows (the pool has 1,760): more of the math expert's signal
    "full_math480": [*FULL, MATH480],
    "full_math480_seed1": [*FULL, MATH480, "seed=1"],
    "full_math480_seed2": [*FULL, MATH480, "seed=2"],
}


def _cli(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "distill", *args], cwd=ROOT, text=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if proc.returncode != 0:
        sys.exit(f"demo_ablation: `distill {' '.join(args)}` failed:\n{proc.stderr[-2000:]}")


def _data_overrides(overrides: list[str]) -> list[str]:
    return sorted(o for o in overrides if o.startswith(("data.", "cache.")))


def run_variant(name: str, overrides: list[str], out: Path) -> dict:
    if not overrides:  # the recipe as shipped: scripts/demo.sh's own run
        return _result(name, overrides, DEMO)
    run = out / name
    # Variants with the same calibration data share one cache (the data overrides name it).
    data = _data_overrides(overrides)
    cache = out / ("cache-" + "-".join(o.replace("=", "_") for o in data)) if data else DEMO / "cache"
    common = [f"run_dir={run}", f"cache.dir={cache}", *overrides]
    if cache != DEMO / "cache":
        _cli("cache", str(RECIPE), *common)
    elif not (cache / "manifest.json").exists():
        sys.exit(f"demo_ablation: no demo cache at {cache}; run scripts/demo.sh first")
    _cli("train", str(RECIPE), *common)
    # The demo's comparison models (base, merges), without other runs' students.
    _cli("eval", str(RECIPE), *common, f"eval.models={json.dumps(_recipe_models())}")
    return _result(name, overrides, run)


def _result(name: str, overrides: list[str], run: Path) -> dict:
    report = json.loads((run / "report.json").read_text())
    train_s = json.loads((run / "train_result.json").read_text())["wall_s"]
    return {"name": name, "overrides": overrides, "train_s": train_s, "report": report}


def _recipe_models() -> list[dict]:
    """The recipe's eval.models minus `student_*` entries (other runs' students)."""
    import yaml

    models = yaml.safe_load(RECIPE.read_text())["eval"]["models"]
    return [m for m in models if not m["name"].startswith("student_")]


def _row(v: dict) -> str:
    r = v["report"]
    s = r["scores"]["student"]
    vs = r["vs_best_merge"].get("student", {}).get("mean")
    ret = r["retention_by_student"].get("student", {})
    gains = " | ".join(f"{100 * x['gain_kept']:.0f}%" if x.get("gain_kept") is not None else "-"
                       for x in (ret.get(e, {}) for e in ("math", "boolq")))
    cells = " | ".join(f"{s[t]:.3f}" if t in s else "-" for t in r["tasks"])
    diff = f"{vs['diff']:+.3f} [{vs['low']:+.3f}, {vs['high']:+.3f}]" if vs else "-"
    over = " ".join(f"`{o}`" for o in v["overrides"]) or "(as shipped)"
    return f"| {v['name']} | {over} | {v['train_s']:.0f} | {cells} | {r['mean']['student']:.3f} | {diff} | {gains} |"


def table(done: list[dict]) -> str:
    r = done[0]["report"]
    best = r["best_merge"]
    head = [f"Best merge: {best}, mean {r['mean'][best]:.3f} over {', '.join(r['mean_tasks'])}; "
            "n per task: " + ", ".join(f"{t} {r['n']['student'][t]}" for t in r["tasks"]) + ".", "",
            "| variant | overrides | train s | " + " | ".join(r["tasks"]) + " | mean | student - best merge (mean) "
            "| gain kept: math | gain kept: boolq |", "|---|---|---:|" + "---:|" * len(r["tasks"]) + "---:|---|---:|---:|"]
    return "\n".join(head + [_row(v) for v in done]) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help="comma-separated variant names")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "ablation")
    args = ap.parse_args(argv)
    if args.list:
        for name, over in VARIANTS.items():
            print(f"{name}: {' '.join(over) or '(as shipped)'}")
        return 0
    names = args.only.split(",") if args.only else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"demo_ablation: unknown variant(s) {', '.join(unknown)} (see --list)")
    done = []
    for name in names:
        done.append(run_variant(name, VARIANTS[name], args.out))
        print(f"{name}: done", flush=True)
    text = table(done)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ablation.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
