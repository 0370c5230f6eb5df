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
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install -c "$constraint" -e "$root[peers]"
# kronfluence declares torchvision, which it never imports; the torchvision wheel pip would pick is a CUDA build
# that fails to import next to the CPU torch (and with it `import lightning`), so kronfluence comes without its deps
"${pip[@]}" install -c "$constraint" --no-deps "kronfluence>=1.0,<1.1"
# kronfluence 1.0.1's wheel also ships its own test suite as a top-level `tests` package, which would shadow this
# repository's tests/ (a regular package wins over a namespace one): remove exactly the files its RECORD lists there
"$venv/bin/python" - <<'PY'
from importlib.metadata import distribution
from pathlib import Path

dist = distribution("kronfluence")
removed = 0
for item in dist.files or []:
    if item.parts and item.parts[0] == "tests":
        path = Path(dist.locate_file(item))
        if path.is_file():
            path.unlink()
            removed += 1
if removed:
    print(f"[inrun] removed kronfluence's top-level tests package ({removed} files) so it cannot shadow tests/")
PY
if "$venv/bin/python" -c "import torchvision" 2>/dev/null; then :; elif "$venv/bin/python" -m pip show -q torchvision >/dev/null 2>&1; then
    echo "[inrun] torchvision is installed but does not import next to this torch: uninstalling it" >&2
    "${pip[@]}" uninstall -y torchvision
fi
after="$("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
if [ "$after" != "$torch_version" ]; then
    echo "[inrun] torch changed from $torch_version to $after" >&2
    exit 1
fi
"$venv/bin/python" -c "from importlib.metadata import version; print('[inrun] dattri', version('dattri'), 'kronfluence', version('kronfluence'))"
