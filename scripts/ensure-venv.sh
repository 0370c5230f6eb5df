#!/usr/bin/env bash
# Create or reuse .venv at the repository root and install inrun into it (idempotent).
# torch is installed first, pinned to the CPU build, so that the project's torch range never pulls a CUDA build.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
py="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    echo "[inrun] creating $venv"
    "$py" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)

if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    echo "[inrun] installing torch (CPU build)"
    # Prefer the wheel that lies on this machine; elsewhere take the CPU build from PyTorch's CPU index.
    "${pip[@]}" install "torch==2.13.0" 2>/dev/null \
        || "${pip[@]}" install "torch>=2.2,<2.15" --index-url https://download.pytorch.org/whl/cpu
fi

stamp="$venv/.inrun-install-stamp"
want="$(cat "$root/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$venv/bin/python" -c "import inrun, inrun.callbacks" 2>/dev/null; then
    echo "[inrun] installing inrun and its dependencies into $venv"
    "${pip[@]}" install -e "$root[test]"
    echo "$want" > "$stamp"
fi
