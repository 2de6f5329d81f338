#!/usr/bin/env bash
# The whole test suite, slow tests included. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
# Tests never reach the Hub or W&B servers: everything they use is local.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline WANDB_SILENT=true
# Two pytest workers on the two cores of a CI machine (pytest-xdist): the slow tests one after the
# other on one worker, the fast ones beside them (tests/conftest.py). `-n 0` after it: one process.
exec .venv/bin/python -m pytest -n 2 --dist loadgroup "$@"
