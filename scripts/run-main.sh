#!/usr/bin/env bash
# Quick start, command 1: the main job (train a small GPT with In-Run Data Shapley, then report and plot).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/ensure-venv.sh"
cd "$root"
export WANDB_MODE=offline WANDB_SILENT=true
exec "$root/.venv/bin/python" -m experiments.main_job "$@"
