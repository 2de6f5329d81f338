#!/usr/bin/env bash
# The main job (recipes/demo.yaml): two SmolLM2-135M-Instruct LoRA experts, math word problems and
# yes/no reading comprehension, consolidated on CPU by weight merging and by distillation.
#   1. cache both experts once on a calibration mix of the two skills
#   2. distil a student that starts from the base            (runs/demo/from_base/)
#   3. distil a student that starts from the TIES merge, then evaluate base, experts, merges and
#      both students on BoolQ (both protocols) and MAWPS, and print the report (runs/demo/report.md)
# Extra args are recipe overrides, applied to every step (run_dir=DIR moves the whole run).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
RUN=runs/demo
for arg in "$@"; do
  case "$arg" in run_dir=*) RUN=${arg#run_dir=} ;; esac
done
D=.venv/bin/distill
start=$(date +%s)
$D cache recipes/demo.yaml "$@"
$D train recipes/demo.yaml "$@" run_dir="$RUN/from_base" cache.dir="$RUN/cache" student.init=null
$D run recipes/demo.yaml "$@"
echo "demo: done in $(( $(date +%s) - start )) s (the from-base student: $RUN/from_base/)"
