"""The structure of mirrorfs/: imports only go down the layers, no cycles, small modules.

The import graph is built with ``ast`` from the source, so every import counts: at module
level, inside functions, under ``TYPE_CHECKING``, relative ones (resolved against the
importing module), and ``importlib.import_module("...")`` with a literal name. ``from pkg
import name`` is an edge to the module ``pkg.name`` when there is one, else to ``pkg``.

Layer order, lowest first (a module imports its own layer or lower ones, never up):

    0  mirrorfs (the package __init__, which imports nothing), mirrorfs.store,
       mirrorfs.daemon (daemonizing, logging setup: imports only store)
    1  mirrorfs.fs, mirrorfs.repl (which do not import each other)
    2  mirrorfs.fuse
    3  mirrorfs.node
    4  mirrorfs.cli, mirrorfs.__main__

A top-level module of mirrorfs missing from ``LAYERS`` is a failure, so that the map is
kept up to date. Each finding is one line; the last tests prove the checker itself on
small synthetic packages.
"""

from __future__ import annotations

import ast
import os
import textwrap
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "mirrorfs"

#: Layer of each top-level module of mirrorfs ("" is the package __init__ itself).
LAYERS: dict[str, int] = {
    "": 0,
    "store": 0,
    "daemon": 0,
    "fs": 1,
    "repl": 1,
    "fuse": 2,
    "node": 3,
    "cli": 4,
    "__main__": 4,
    "mount_helper": 4,
}
#: Top-level modules of one layer that must not import each other.
APART: list[frozenset[str]] = [frozenset({"fs", "repl"})]
#: What a top-level module may import of mirrorfs at most (beyond what its layer allows).
ONLY: dict[str, frozenset[str]] = {"daemon": frozenset({"", "daemon", "store"})}

MAX_MODULE_LINES = 600
MAX_CLASS_METHODS = 30
#: Classes whose methods are the POSIX operations themselves (besides pyfuse3 Operations).
BIG_CLASSES = frozenset({"Filesystem"})


@dataclass(slots=True)
class Package:
    """The modules of a package under ``root`` and the import edges between them."""

    root: Path
    name: str = PACKAGE
    files: dict[str, Path] = field(default_factory=dict)  # dotted module name -> file
    trees: dict[str, ast.Module] = field(default_factory=dict)
    # importer -> imported -> line of the first such import in the importer
    edges: dict[str, dict[str, int]] = field(default_factory=dict)


def load(root: Path, name: str = PACKAGE) -> Package:
    """Parse every module of package ``name`` under ``root`` and build its import graph."""
    pkg = Package(root, name)
    for dirpath, dirnames, filenames in os.walk(root / name):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for fn in sorted(filenames):
            if fn.endswith(".py"):
                path = Path(dirpath) / fn
                parts = list(path.relative_to(root).with_suffix("").parts)
                if parts[-1] == "__init__":
                    parts.pop()
                pkg.files[".".join(parts)] = path
    for mod, path in pkg.files.items():
        pkg.trees[mod] = ast.parse(path.read_text(), str(path))
    for mod, tree in pkg.trees.items():
        out = pkg.edges.setdefault(mod, {})
        for node in ast.walk(tree):
            for target in _targets(pkg, mod, node):
                known = _known(pkg, target)
                if known is not None and known != mod:
                    out[known] = min(out.get(known, node.lineno), node.lineno)
    return pkg


def _is_package(pkg: Package, mod: str) -> bool:
    return pkg.files[mod].name == "__init__.py"


def _known(pkg: Package, dotted: str) -> str | None:
    """The module of the package that importing ``dotted`` runs (its longest known prefix)."""
    while dotted:
        if dotted in pkg.files:
            return dotted
        dotted = dotted.rpartition(".")[0]
    return None


def _targets(pkg: Package, mod: str, node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            # "." is the importer's package: the module itself for an __init__, else its parent.
            base = mod.split(".")
            drop = node.level - (1 if _is_package(pkg, mod) else 0)
            base = base[: len(base) - drop] if drop else base
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        return [
            f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in pkg.files else prefix
            for alias in node.names
        ]
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute | ast.Name)
        and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id)
        in ("import_module", "__import__")
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    ):
        return [node.args[0].value]
    return []


def top(pkg: Package, mod: str) -> str:
    """The top-level module of ``mod`` ("" for the package __init__)."""
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def _where(pkg: Package, mod: str, line: int) -> str:
    return f"{pkg.files[mod].relative_to(pkg.root)}:{line}"


# -- the checks, each a list of one-line findings


def unknown_modules(pkg: Package) -> list[str]:
    return sorted(
        f"unknown top-level module {pkg.name}.{t}: give it a layer in LAYERS (tests/test_layers.py)"
        for t in {top(pkg, m) for m in pkg.files}
        if t not in LAYERS
    )


def layer_violations(pkg: Package) -> list[str]:
    found = []
    for mod, targets in sorted(pkg.edges.items()):
        src = top(pkg, mod)
        for target, line in sorted(targets.items()):
            dst = top(pkg, target)
            if src not in LAYERS or dst not in LAYERS:
                continue  # reported by unknown_modules
            where = _where(pkg, mod, line)
            if LAYERS[dst] > LAYERS[src]:
                found.append(
                    f"upward import {mod} -> {target} (layer {LAYERS[src]} -> {LAYERS[dst]}) "
                    f"at {where}"
                )
            elif src != dst and any({src, dst} <= apart for apart in APART):
                found.append(
                    f"forbidden import {mod} -> {target} ({src} and {dst} stay apart) at {where}"
                )
            elif src in ONLY and dst not in ONLY[src]:
                allowed = ", ".join(sorted(ONLY[src] - {src, ""}))
                found.append(
                    f"forbidden import {mod} -> {target} ({src} imports only {allowed}) at {where}"
                )
    return found


def init_imports(pkg: Package) -> list[str]:
    """The package __init__ imports nothing (importing any submodule runs it first)."""
    found = []
    for node in ast.walk(pkg.trees.get(pkg.name, ast.Module(body=[], type_ignores=[]))):
        if isinstance(node, ast.Import | ast.ImportFrom) and not (
            isinstance(node, ast.ImportFrom) and node.module == "__future__"
        ):
            found.append(
                f"{pkg.name}/__init__.py imports ({ast.unparse(node)}) at "
                f"{_where(pkg, pkg.name, node.lineno)}"
            )
    return found


def cycles(pkg: Package) -> list[str]:
    """One line per group of mutually importing modules (a strongly connected component)."""
    found = []
    for group in _components(pkg.edges):
        path = _shortest_cycle(pkg.edges, min(group), group)
        found.append(
            f"import cycle {' -> '.join(path)} (group of {len(group)}: {', '.join(sorted(group))})"
        )
    return sorted(found)


def _components(edges: dict[str, dict[str, int]]) -> list[set[str]]:
    """Tarjan's strongly connected components of more than one module, iteratively."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, {}))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges.get(w, {})))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    group = set()
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        group.add(w)
                        if w == v:
                            break
                    if len(group) > 1:
                        groups.append(group)
    return groups


def _shortest_cycle(edges: dict[str, dict[str, int]], start: str, group: set[str]) -> list[str]:
    """A shortest path start -> ... -> start inside ``group`` (breadth first)."""
    prev: dict[str, str] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(edges.get(v, {})):
            if w not in group:
                continue
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(prev[path[-1]])
                return [start, *reversed(path[:-1]), start] if v != start else [start, start]
            if w not in prev:
                prev[w] = v
                queue.append(w)
    raise AssertionError(f"{start} is in no cycle of {sorted(group)}")


def sizes(pkg: Package) -> list[str]:
    found = []
    for mod, path in sorted(pkg.files.items()):
        lines = path.read_text().count("\n")
        rel = path.relative_to(pkg.root)
        if lines > MAX_MODULE_LINES:
            found.append(f"{rel}: {lines} lines (at most {MAX_MODULE_LINES})")
        for node in ast.walk(pkg.trees[mod]):
            if not isinstance(node, ast.ClassDef) or node.name in BIG_CLASSES:
                continue
            if any(ast.unparse(base).endswith("Operations") for base in node.bases):
                continue  # a pyfuse3 adapter: its methods are the FUSE operations
            methods = sum(
                isinstance(b, ast.FunctionDef | ast.AsyncFunctionDef)
                and not b.name.startswith("__")
                for b in node.body
            )
            if methods > MAX_CLASS_METHODS:
                found.append(
                    f"{rel}:{node.lineno}: class {node.name} has {methods} methods "
                    f"(at most {MAX_CLASS_METHODS})"
                )
    return found


def _report(findings: list[str]) -> str:
    return f"{len(findings)} finding(s):\n" + "\n".join(findings)


# -- mirrorfs itself


def test_every_top_level_module_has_a_layer():
    found = unknown_modules(load(REPO))
    if found:
        pytest.fail(_report(found), pytrace=False)


def test_no_import_cycles():
    found = cycles(load(REPO))
    if found:
        pytest.fail(_report(found), pytrace=False)


def test_imports_only_go_down_the_layers():
    pkg = load(REPO)
    found = init_imports(pkg) + layer_violations(pkg)
    if found:
        pytest.fail(_report(found), pytrace=False)


def test_modules_and_classes_stay_small():
    found = sizes(load(REPO))
    if found:
        pytest.fail(_report(found), pytrace=False)


# -- the checker on synthetic packages


def _make(tmp_path: Path, files: dict[str, str]) -> Package:
    for rel, text in files.items():
        path = tmp_path / PACKAGE / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
        # every directory on the way is a package
        for parent in path.relative_to(tmp_path).parents:
            init = tmp_path / parent / "__init__.py"
            if parent != Path(".") and not init.exists():
                init.write_text("")
    return load(tmp_path)


CLEAN = {
    "__init__.py": '"""a package that imports nothing"""\n__version__ = "0"\n',
    "store/volume.py": "import os\nfrom .errors import Failed\n",
    "store/errors.py": "class Failed(Exception):\n    pass\n",
    "daemon.py": "from mirrorfs.store import errors\n",
    "fs/filesystem.py": (
        "from typing import TYPE_CHECKING\n"
        "from ..store.volume import os\n"
        "from . import layout\n"
        "if TYPE_CHECKING:\n"
        "    from mirrorfs.store.volume import Volume\n"
    ),
    "fs/layout.py": "def f():\n    from mirrorfs.store import errors\n",
    "repl/wire.py": "import mirrorfs.store.errors\n",
    "fuse/ops.py": (
        "import pyfuse3\nfrom mirrorfs.fs import filesystem\n"
        "class Operations(pyfuse3.Operations):\n"
        + "".join(f"    def op{i}(self): pass\n" for i in range(40))
    ),
    "node/source.py": "from mirrorfs.fuse.ops import Operations\nfrom mirrorfs.repl import wire\n",
    "cli.py": "from mirrorfs.node import source\nimport importlib\n",
    "__main__.py": "from mirrorfs.cli import main\n",
}


def test_checker_passes_a_clean_package(tmp_path):
    pkg = _make(tmp_path, CLEAN)
    assert pkg.edges["mirrorfs.fs.filesystem"] == {
        "mirrorfs.store.volume": 2,
        "mirrorfs.fs.layout": 3,
    }
    assert pkg.edges["mirrorfs.store.volume"] == {"mirrorfs.store.errors": 2}
    assert "mirrorfs.store.errors" in pkg.edges["mirrorfs.fs.layout"]  # inside a function
    assert set(pkg.edges["mirrorfs.daemon"]) == {"mirrorfs.store.errors"}  # module of a pkg
    for check in (unknown_modules, cycles, layer_violations, init_imports, sizes):
        assert check(pkg) == [], check.__name__


def test_checker_finds_cycles_and_upward_imports(tmp_path):
    pkg = _make(
        tmp_path,
        CLEAN
        | {
            # a cycle of three through a function-level and a relative import
            "fs/layout.py": "def f():\n    from . import extents\n",
            "fs/extents.py": "from .filesystem import x\n",
            # up (to modules that import nothing back): under TYPE_CHECKING, by importlib
            "fuse/leaf.py": "",
            "store/errors.py": (
                "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                "    from mirrorfs.fuse.leaf import Leaf\n"
            ),
            "fs/xattrs.py": "import importlib\nimportlib.import_module('mirrorfs.node.source')\n",
            "repl/wire.py": "from mirrorfs.fs.layout import f\n",
            "daemon.py": "from mirrorfs import fs\n",
            "__init__.py": "from mirrorfs import cli\n",
            "extra.py": "",
        },
    )
    assert cycles(pkg) == [
        "import cycle mirrorfs.fs.extents -> mirrorfs.fs.filesystem -> mirrorfs.fs.layout -> "
        "mirrorfs.fs.extents (group of 3: mirrorfs.fs.extents, mirrorfs.fs.filesystem, "
        "mirrorfs.fs.layout)"
    ]
    violations = layer_violations(pkg)
    assert any(
        v.startswith("upward import mirrorfs.store.errors -> mirrorfs.fuse.leaf (layer 0 -> 2)")
        and "mirrorfs/store/errors.py:3" in v
        for v in violations
    ), violations
    assert any(
        v.startswith("upward import mirrorfs.fs.xattrs -> mirrorfs.node.source") for v in violations
    ), violations
    assert any(
        v.startswith("forbidden import mirrorfs.repl.wire -> mirrorfs.fs.layout")
        for v in violations
    ), violations
    assert any(v.startswith("upward import mirrorfs.daemon -> mirrorfs.fs") for v in violations)
    assert init_imports(pkg) == [
        "mirrorfs/__init__.py imports (from mirrorfs import cli) at mirrorfs/__init__.py:1"
    ]
    assert unknown_modules(pkg) == [
        "unknown top-level module mirrorfs.extra: give it a layer in LAYERS (tests/test_layers.py)"
    ]


def test_checker_finds_long_modules_and_big_classes(tmp_path):
    many = "".join(f"    def m{i}(self): pass\n" for i in range(MAX_CLASS_METHODS + 1))
    pkg = _make(
        tmp_path,
        CLEAN
        | {
            "store/big.py": "x = 1\n" * (MAX_MODULE_LINES + 1),
            "store/wide.py": f"class Wide:\n{many}class Filesystem:\n{many}",
        },
    )
    assert sizes(pkg) == [
        f"mirrorfs/store/big.py: {MAX_MODULE_LINES + 1} lines (at most {MAX_MODULE_LINES})",
        f"mirrorfs/store/wide.py:1: class Wide has {MAX_CLASS_METHODS + 1} methods "
        f"(at most {MAX_CLASS_METHODS})",
    ]
