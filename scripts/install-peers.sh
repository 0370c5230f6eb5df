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
# the peers' wheels also ship their own repositories' top-level folders as packages (kronfluence: tests, experiments;
# dattri: experiments, test, docs, examples); `tests` and `experiments` would shadow or collide with this repository's
# own, so remove exactly the files their RECORDs list under those names
"$venv/bin/python" - <<'PY'
from importlib.metadata import distribution
from pathlib import Path

STRAY = {"tests", "test", "experiments", "docs", "examples"}
for name in ("dattri", "kronfluence"):
    dist = distribution(name)
    removed = 0
    for item in dist.files or []:
        if len(item.parts) > 1 and item.parts[0] in STRAY:
            path = Path(dist.locate_file(item))
            if path.is_file():
                path.unlink()
                removed += 1
    if removed:
        print(f"[inrun] removed {removed} files of {name}'s top-level {sorted(STRAY)} folders (not part of the library)")
    for folder in STRAY:  # and the folders left holding nothing but empty folders
        top = Path(dist.locate_file(folder))
        if top.is_dir() and not any(p.is_file() for p in top.rglob("*")):
            for sub in sorted(top.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                sub.rmdir()
            top.rmdir()
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
