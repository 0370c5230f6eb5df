#!/usr/bin/env bash
# Quick start, command 2: the test suite. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/ensure-venv.sh"
cd "$root"
export WANDB_MODE=offline WANDB_SILENT=true
exec "$root/.venv/bin/python" -m pytest "$@"
