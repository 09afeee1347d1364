"""The layout's rules, checked on the source: the dependency direction, no import cycles (also
through imports inside functions), no reads of another package's private attributes, every
module importable on its own, and no oversized module without a stated reason."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("segmenter", "recalibration", "envs", "agents", "experiments")
#: What each package may import (besides itself): experiments -> agents -> envs ->
#: (segmenter, recalibration), and recalibration -> segmenter.
ALLOWED = {
    "segmenter": set(),
    "recalibration": {"segmenter"},
    "envs": {"segmenter", "recalibration"},
    "agents": {"envs", "segmenter", "recalibration"},
    "experiments": {"agents", "envs", "segmenter", "recalibration"},
}
#: Private names of third-party objects read on purpose, with the reason.
THIRD_PARTY_PRIVATE = {
    ("agents/fast_policy.py", "_version"): "torch's per-tensor version counter: the only signal "
    "of an in-place change to a Parameter (optimizer steps), which must re-export the graph",
    ("agents/features.py", "_build_mlp_extractor"): "SB3's hook for custom actor-critic "
    "networks (called from the policy's _build, as SB3's own policies do)",
    **{
        ("recalibration/features.py", name): "efficientnet-lite-pytorch keeps its stem and "
        "blocks private and its extract_features returns only the last map; the stride-8/16 "
        "maps need the blocks one by one"
        for name in ("_swish", "_bn0", "_conv_stem", "_blocks")
    },
}
#: Modules allowed over ~500 lines; the reason must be stated at the top of the module.
LONG_MODULES: dict[str, str] = {}
MAX_LINES = 520


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


MODULES = _modules()


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes inside ``if TYPE_CHECKING:`` blocks (annotations only)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            for child in node.body:
                skip.update(id(n) for n in ast.walk(child))
    return skip


def _imports(name: str, path: Path) -> set[str]:
    """Project modules ``name`` imports anywhere in its file (functions included), as module
    names: ``from pkg import sub`` counts as ``pkg.sub`` when that is a module."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_nodes(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in MODULES else base)
    return {m for m in out if m.split(".")[0] in PACKAGES}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_dependency_direction():
    bad = []
    for name, deps in GRAPH.items():
        pkg = name.split(".")[0]
        for dep in deps:
            top = dep.split(".")[0]
            if top != pkg and top not in ALLOWED[pkg]:
                bad.append(f"{name} imports {dep}")
    assert not bad, (
        "imports against experiments -> agents -> envs -> (segmenter, recalibration):\n"
        + "\n".join(bad)
    )


def test_no_import_cycles_even_inside_functions():
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(GRAPH.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep) :] + [dep])
            elif dep in GRAPH and state.get(dep) is None:
                visit(dep, stack)
        stack.pop()
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_finds_a_cycle():
    """The checker sees an import inside a function (so the test above has teeth)."""
    saved = dict(GRAPH)
    try:
        GRAPH["segmenter.base"] = GRAPH["segmenter.base"] | {"segmenter.session"}
        with pytest.raises(AssertionError, match="segmenter.session"):
            test_no_import_cycles_even_inside_functions()
    finally:
        GRAPH.clear()
        GRAPH.update(saved)


def _private_names_defined(paths: list[Path]) -> set[str]:
    names: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def private_reads(pkg: str) -> list[str]:
    """``obj._name`` reads (and ``from x import _name``) in ``pkg`` of names ``pkg`` does not
    define itself: private state of another package's (or library's) objects."""
    paths = sorted((REPO / pkg).rglob("*.py"))
    own = _private_names_defined(paths)
    bad = []
    for path in paths:
        rel = path.relative_to(REPO).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute):
                attr = node.attr
                if not attr.startswith("_") or attr.startswith("__") or attr in own:
                    continue
                if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                    continue
                if (rel, attr) in THIRD_PARTY_PRIVATE:
                    continue
                bad.append(f"{rel}:{node.lineno} reads .{attr}")
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] != pkg:
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        bad.append(f"{rel}:{node.lineno} imports {alias.name}")
    return bad


@pytest.mark.parametrize("pkg", PACKAGES)
def test_no_private_state_of_other_packages_is_read(pkg):
    bad = private_reads(pkg)
    assert not bad, "\n".join(bad)


def test_the_private_read_check_finds_a_read(tmp_path, monkeypatch):
    pkg = tmp_path / "agents"
    pkg.mkdir()
    (pkg / "x.py").write_text("def f(env):\n    return env._iou\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert private_reads("agents") == ["agents/x.py:2 reads ._iou"]


def test_every_module_imports():
    """Every module imports in a fresh interpreter (one for all: each import runs with the
    modules before it loaded, and the first of each package fresh)."""
    names = sorted(n for n in MODULES if not n.endswith("__main__"))
    code = f"import importlib\nfor n in {names!r}:\n    importlib.import_module(n)\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_no_oversized_module_without_a_reason():
    bad = []
    for name, path in MODULES.items():
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES:
            reason = LONG_MODULES.get(name)
            head = path.read_text()[:2000]
            if reason is None or reason not in head:
                bad.append(f"{name}: {lines} lines")
    assert not bad, "split these modules or state why not at their top:\n" + "\n".join(bad)
