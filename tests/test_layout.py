"""The package's architecture holds: no import circle, lower layers never import higher ones, the store needs no torch.

These read the source with ``ast`` (independent of how the modules behave) and import in fresh processes.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: lowest first; a module may import only from its own layer or the ones before it
LAYERS = ["inrun.errors", "inrun.version", "inrun.engine", "inrun.store", "inrun.valuation", "inrun.posthoc",
          "inrun.cli", "inrun.callbacks"]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "callbacks":
        parts = ["inrun", "callbacks", *parts[1:]]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, tuple[set[str], set[str]]]:
    """module -> (imports at load time, imports inside functions), inrun modules only."""
    found = {}
    for path in [*ROOT.joinpath("inrun").rglob("*.py"), *ROOT.joinpath("callbacks").glob("*.py")]:
        tree = ast.parse(path.read_text())
        top_level = {id(node) for node in tree.body}
        eager, late = set(), set()
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            names = [n for n in names if n == "inrun" or n.startswith("inrun.")]
            (eager if id(node) in top_level else late).update(names)
        found[_module_name(path)] = (eager, late)
    return found


def _layer(module: str) -> int:
    for index, prefix in enumerate(LAYERS):
        if module == prefix or module.startswith(prefix + "."):
            return index
    raise AssertionError(f"module {module} belongs to no layer; add it to LAYERS")


def test_every_module_belongs_to_a_layer_and_imports_only_downwards():
    wrong = []
    for module, (eager, late) in _imports().items():
        if module == "inrun":  # the front end re-exports from every layer
            continue
        for target in eager | late:
            if _layer(target) > _layer(module):
                wrong.append(f"{module} -> {target}")
    assert not wrong, f"imports of a higher layer: {wrong}"


def test_no_import_circle():
    graph = {module: {t for t in eager if t != module and not t.startswith(module + ".")}
             for module, (eager, _) in _imports().items()}
    modules = set(graph)
    state: dict[str, int] = {}
    circles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            target = target if target in modules else target.rsplit(".", 1)[0]
            if target not in modules:
                continue
            if state.get(target) == 1:
                circles.append(path[path.index(target):] + [target] if target in path else [node, target])
            elif not state.get(target):
                visit(target, path + [target])
        state[node] = 2

    for module in sorted(graph):
        if not state.get(module):
            visit(module, [module])
    assert not circles, f"import circles: {circles}"


@pytest.mark.parametrize("statement", [
    "import inrun",
    "import inrun.store",
    "from inrun import open_run, RunWriter, repack",
    "import inrun.cli",
])
def test_front_end_and_store_load_without_torch(statement):
    code = f"import sys\n{statement}\nassert 'torch' not in sys.modules, 'torch was imported'\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_contract_names_resolve():
    code = (
        "import inrun, inrun.callbacks\n"
        "for name in ['grad_dots', 'grad_norms', 'open_run', 'InRunRecorder', 'Run', 'GradientCapture',\n"
        "             'CapturedBatch', 'register_layer', 'RunWriter', 'repack', 'StoreError']:\n"
        "    assert callable(getattr(inrun, name)), name\n"
        "for name in ['InRunCallback', 'DeepSpeedInRun', 'DeepSpeedAdapter', 'WandbInfluenceLogger', 'log_posthoc']:\n"
        "    assert callable(getattr(inrun.callbacks, name)), name\n"
        "assert callable(inrun.cli.posthoc_path) and callable(inrun.embeddings.build_embeddings)\n"
        "assert callable(inrun.baselines.tracin)\n"
        "try:\n"
        "    inrun.no_such_name\n"
        "except AttributeError:\n"
        "    pass\n"
        "else:\n"
        "    raise AssertionError('unknown names must raise AttributeError')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
