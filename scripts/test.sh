#!/usr/bin/env bash
# The whole test suite, slow tests included. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
# Tests never reach the Hub or W&B servers: everything they use is local.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline WANDB_SILENT=true
if [ $# -gt 0 ]; then
  exec .venv/bin/python -m pytest "$@"
fi
# No arguments: the whole suite as two pytest sessions side by side, one per core: the slow tier
# (multi-process runs, the experts' reproductions, the demo and the experiment at torch's default
# threads), one test after the other, and beside it the fast tier, one thread in process. Two heavy
# runs at once would oversubscribe two cores. The fast tier's report follows the slow one's.
export DISTILL_TEST_THREADS=1
tmp=$(mktemp -d)
.venv/bin/python -m pytest -m "not slow" -p no:cacheprovider --basetemp="$tmp/fast" > "$tmp/fast.log" 2>&1 &
fast=$!
set +e
.venv/bin/python -m pytest -m slow --basetemp="$tmp/slow"
slow_rc=$?
wait "$fast"
fast_rc=$?
echo "==================== the fast tier (not slow), run beside the slow one ===================="
cat "$tmp/fast.log"
rm -rf "$tmp"
echo "test.sh: slow tier exit $slow_rc, fast tier exit $fast_rc"
[ "$slow_rc" -eq 0 ] && [ "$fast_rc" -eq 0 ]
