#!/usr/bin/env bash
# The main job: the synthetic consolidation experiment end to end on CPU
# (tiny base + two experts -> cache -> distil -> evaluate). Extra args are recipe overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/distill run recipes/synthetic.yaml "$@"
