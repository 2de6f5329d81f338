"""The `distill` command line.

    distill validate RECIPE [key.sub=value ...]     check a recipe, print it resolved
    distill cache    RECIPE [overrides]             capture teacher distributions (resumable)
    distill cache verify CACHE_DIR_OR_RUN_DIR       check every shard's sha256
    distill train    RECIPE [overrides] [--resume]  distil into the student (also under accelerate launch)
    distill eval     RECIPE [overrides] [--harness TASK,...] [--no-eval-cache]
    distill publish  RECIPE_OR_RUN [overrides] [--format merged|adapter] [--dry-run]
                                                    write <run>/publish/ (model folder + card), push it to the Hub
    distill run      RECIPE [overrides] [--plan PLAN.json]  every stage in turn: cache, train, eval (publish if asked)
    distill plan     RECIPE --gpu NAME --minutes M [--gpus N] [--zero S] [--config-dir D] [--json] [--measure]
                                                    time, disk and memory per stage before spending any
    distill import-gguf FILE OUT [--dtype D] [--force]  a GGUF causal LM as a safetensors model folder

A user mistake prints one line, `distill: error: ...`, and exits with status 2.
"""

from __future__ import annotations

import argparse
import errno
import sys
import time
import traceback
from pathlib import Path

from distill.distributed import partial_state
from distill.errors import DistillError
from distill.files import FULL
from distill.gguf import DTYPES
from distill.secrets import scrub, scrubbed_streams

STAGES = ("validate", "cache", "train", "eval", "publish", "run")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distill", description="Multi-teacher distillation of expert LLMs.")
    sub = p.add_subparsers(dest="stage", required=True, metavar="STAGE")
    helps = {"validate": "check a recipe and print it resolved", "cache": "capture the teachers' top-k",
             "train": "train the student from the cache", "eval": "evaluate student, teachers, baselines",
             "publish": "write the model folder + card, push it to the Hub", "run": "all stages in turn"}
    for name in STAGES:
        sp = sub.add_parser(name, help=helps[name])
        sp.add_argument("recipe", help="recipe YAML (or, for `cache verify`, the word verify; "
                        "for publish, a run directory)")
        sp.add_argument("overrides", nargs="*", help="key.sub=value overrides")
        if name in ("train", "run"):
            sp.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
        if name == "eval":
            sp.add_argument("--harness", default=None, help="comma-separated lm-eval task names to run too")
        if name in ("eval", "run"):
            sp.add_argument("--no-eval-cache", action="store_true",
                            help="score every model again (same as eval.cache=false)")
        if name in ("publish", "run"):
            sp.add_argument("--dry-run", action="store_true", help="write <run>/publish/, push nothing")
        if name == "publish":
            sp.add_argument("--format", choices=("merged", "adapter"), default=None,
                            help="full model, or a LoRA student's adapter alone (same as publish.format=...)")
        if name in ("cache", "train", "run"):
            sp.add_argument("--plan", default=None, metavar="PLAN.json",
                            help="apply a `distill plan --json` file's overrides (data rows, steps, budget)")
    _plan_parser(sub)
    sp = sub.add_parser("import-gguf", help="convert a GGUF causal LM into a safetensors model folder")
    sp.add_argument("file", help="the .gguf file")
    sp.add_argument("out", help="the model folder to write (must not exist, or be empty)")
    sp.add_argument("--dtype", default="auto", choices=DTYPES,
                    help="weights' dtype; auto: the file's own float type, float32 for quantized blocks")
    sp.add_argument("--force", action="store_true", help="replace OUT if it is not empty")
    return p


def _plan_parser(sub) -> None:
    sp = sub.add_parser("plan", help="estimate time, disk and memory per stage on given hardware")
    sp.add_argument("recipe", help="recipe YAML")
    sp.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    sp.add_argument("--gpu", required=True, help="hardware name from the table (a6000, a100-80, h100, ..., cpu)")
    sp.add_argument("--minutes", required=True, type=float, help="the whole budget, evaluation included")
    sp.add_argument("--gpus", type=int, default=1, help="devices (data-parallel); default 1")
    sp.add_argument("--zero", type=int, default=0, choices=(0, 1, 2, 3),
                    help="DeepSpeed ZeRO stage (0: plain accelerate / DDP)")
    sp.add_argument("--config-dir", default=None,
                    help="folder mirroring Hub ids (DIR/org/name/config.json, adapter_config.json) to plan offline")
    sp.add_argument("--json", action="store_true", help="print the plan as JSON (the file --plan reads)")
    sp.add_argument("--measure", action="store_true",
                    help="run a few real capture batches and training steps here and use the measured rates")


def _plan(args: argparse.Namespace) -> int:
    import json

    from distill import stages
    from distill.plan import make_plan
    from distill.plan.gpus import get_hardware
    from distill.plan.report import render

    get_hardware(args.gpu)  # a bad name fails before any work
    if args.minutes <= 0 or args.gpus < 1:
        raise DistillError("--minutes must be > 0 and --gpus >= 1")
    recipe = stages.load(args.recipe, args.overrides)
    rates, measured = None, None
    if args.measure:
        from distill.plan.measure import measure

        import contextlib

        # the stages' libraries print to stdout (DeepSpeed's accelerator notice, progress lines):
        # keep stdout for the plan alone, so `--json > plan.json` stays a JSON file
        with contextlib.redirect_stdout(sys.stderr):
            rates, measured = measure(args.recipe, args.overrides, args.gpu, args.config_dir,
                                      log=(lambda *a, **k: print(*a, file=sys.stderr, **k)))
    plan = make_plan(recipe, args.gpu, args.minutes, gpus=args.gpus, zero=args.zero, config_dir=args.config_dir,
                     rates=rates)
    plan["measured"] = measured
    print(json.dumps(plan, indent=1) if args.json else render(plan))
    return 0


def plan_overrides(path: str, recipe_path: str) -> list[str]:
    """The overrides a `distill plan --json` file proposes (checked to be a plan of this recipe)."""
    import json

    import yaml

    from distill.plan import FORMAT

    try:
        plan = json.loads(open(path).read())
    except (OSError, ValueError) as exc:
        raise DistillError(f"--plan {path}: not a readable plan file ({str(exc)[:100]})") from None
    if not isinstance(plan, dict) or plan.get("format") != FORMAT:
        raise DistillError(f"--plan {path}: not a `distill plan --json` file (format {FORMAT})")
    name = (yaml.safe_load(open(recipe_path).read()) or {}).get("name")
    if plan.get("recipe") != name:
        raise DistillError(f"--plan {path}: a plan of recipe {plan.get('recipe')!r}, not of {name!r}")
    return list(plan["budget"]["overrides"])


def dispatch(args: argparse.Namespace, start: float) -> int:
    from distill import stages

    if args.stage == "import-gguf":
        from distill.gguf import import_gguf

        out = import_gguf(args.file, args.out, dtype=args.dtype, force=args.force)
        print(f"wrote {out}")
        return 0
    if args.stage == "cache" and args.recipe == "verify":
        if len(args.overrides) != 1:
            raise DistillError("usage: distill cache verify CACHE_DIR_OR_RUN_DIR")
        stages.verify_cache(args.overrides[0])
        return 0
    if args.stage == "plan":
        return _plan(args)
    if getattr(args, "plan", None):  # the plan's overrides first: the user's own win over them
        args.overrides[:0] = plan_overrides(args.plan, args.recipe)
    if getattr(args, "no_eval_cache", False):
        args.overrides.append("eval.cache=false")  # one switch, recorded in the resolved recipe
    if getattr(args, "format", None):
        args.overrides.append(f"publish.format={args.format}")
    if args.stage == "publish" and Path(args.recipe).is_dir():  # a run directory: the recipe it was made with
        resolved = Path(args.recipe) / "recipe.resolved.yaml"
        if not resolved.is_file():
            raise DistillError(f"publish: {args.recipe} is a folder without recipe.resolved.yaml (not a run directory)")
        args.recipe = str(resolved)
    from distill.progress import quiet_library_bars

    # "Loading weights" bars are hundreds of redraws in a log file; so is the GGUF conversion
    # that loading a recipe naming {smollm2} may run
    quiet_library_bars()
    recipe = stages.load(args.recipe, args.overrides)
    if args.stage == "validate":
        stages.show(recipe, args.recipe, args.overrides)
        return 0
    state = partial_state()
    main = state is None or state.is_main_process
    log = print if main else (lambda *a, **k: None)
    stages.prepare_run_dir(recipe, args.recipe, args.overrides, log=log)
    if args.stage == "cache":
        stages.cache(recipe, state, log)
    elif args.stage == "train":
        stages.train(recipe, args.resume, start, log)
    elif args.stage == "eval":
        stages.evaluate(recipe, harness=args.harness, log=log)
    elif args.stage == "publish":
        stages.publish(recipe, dry_run=args.dry_run, log=log)
    elif args.stage == "run":
        stages.run_all(recipe, state, resume=args.resume, dry_run=args.dry_run, start=start, log=log)
    return 0


def main(argv: list[str] | None = None) -> None:
    start = time.time()
    with scrubbed_streams():  # no credential reaches the terminal or a log file, whatever prints it
        try:
            code = _guarded(_parser().parse_args(argv), start)
        except Exception:  # a bug in distill: its traceback, printed here while stderr is still scrubbed
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
    sys.exit(code)


def _guarded(args: argparse.Namespace, start: float) -> int:
    """The command's exit status: a user mistake (DistillError) or a full disk is one line and 2."""
    try:
        return dispatch(args, start)
    except DistillError as exc:
        _error(str(exc))
    except OSError as exc:
        if exc.errno not in FULL:
            raise
        what = "the file size limit (RLIMIT_FSIZE) reached" if exc.errno == errno.EFBIG else "no space left on device"
        _error(f"{what} writing {exc.filename or 'output'}; free space and rerun (finished files are kept, the "
               "unfinished one was never renamed into place)")
    except KeyboardInterrupt:
        print("distill: interrupted", file=sys.stderr)
        return 130
    return 2


def _error(message: str) -> None:
    print("distill: error: " + scrub(" ".join(message.split())), file=sys.stderr)  # one line, always
