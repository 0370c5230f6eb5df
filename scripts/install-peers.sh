#!/usr/bin/env bash
# Install the LDS benchmark's peers (the `peers` extra: dattri, kronfluence) into .venv, keeping the torch that is
# already there: pip gets a constraint pinning torch to the installed version, so a peer's own torch range can never
# pull another build (for example CUDA wheels in place of the CPU one). Not needed by the tests or by CI.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
if [ ! -x "$venv/bin/python" ]; then
    "$root/scripts/ensure-venv.sh"
fi
torch_version="$("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
constraint="$(mktemp)"
trap 'rm -f "$constraint"' EXIT
echo "torch==$torch_version" > "$constraint"
echo "[inrun] installing the peers extra (dattri, kronfluence) with torch pinned to $torch_version"
"$venv/bin/python" -m pip --disable-pip-version-check -q install -c "$constraint" -e "$root[peers]"
after="$("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
if [ "$after" != "$torch_version" ]; then
    echo "[inrun] torch changed from $torch_version to $after" >&2
    exit 1
fi
"$venv/bin/python" -c "from importlib.metadata import version; print('[inrun] dattri', version('dattri'), 'kronfluence', version('kronfluence'))"
