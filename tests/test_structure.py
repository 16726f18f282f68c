"""Structure of the `rewriter` package, checked from the source text (AST) without importing it.

Sizes of files and classes, private names kept private, intra-package imports at module level (so the import graph
that `lint-imports` checks against the contracts in pyproject.toml is the whole graph), no name in a package's
`__init__` hiding one of its submodules, and mypy over the typed core.
"""
from __future__ import annotations

import ast
import functools
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "rewriter"

MAX_FILE_LINES = 400
MAX_CLASS_LINES = 300
# modules allowed to import rewriter modules inside functions: the CLI keeps `rewriter --help` fast
FUNCTION_IMPORTS_ALLOWED = {"rewriter/cli.py"}
# the files mypy checks (its configuration, [tool.mypy] in pyproject.toml, names the same list)
MYPY_FILES = ["rewriter/methods/base.py", "rewriter/methods/registry.py", "rewriter/methods/checks.py", "rewriter/core"]
# mypy's cache lives outside the repository and survives between runs: cold (mostly reading torch's types) it takes
# about a minute on a 2-core machine, warm a few seconds
MYPY_CACHE = Path(tempfile.gettempdir()) / "rewriter-mypy-cache"


def _files() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


@functools.cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _package_of(path: Path) -> list[str]:
    """The dotted package a file's relative imports start from (level 1)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return parts[:-1]  # the containing package, for both `pkg/__init__.py` and `pkg/mod.py`


def _absolute(path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = _package_of(path)
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _is_intra(name: str) -> bool:
    return name == "rewriter" or name.startswith("rewriter.")


def _report(what: str, offenders: list[str]) -> str:
    return f"{len(offenders)} {what}:\n  " + "\n  ".join(offenders)


def test_file_lengths():
    offenders = []
    for path in _files():
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_FILE_LINES:
            offenders.append(f"{_rel(path)}: {n} lines")
    assert not offenders, _report(f"files over {MAX_FILE_LINES} lines", offenders)


def test_class_lengths():
    offenders = []
    for path in _files():
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.ClassDef):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                n = node.end_lineno - start + 1
                if n > MAX_CLASS_LINES:
                    offenders.append(f"{_rel(path)}:{node.lineno}: class {node.name} is {n} lines")
    assert not offenders, _report(f"classes over {MAX_CLASS_LINES} lines", offenders)


def test_no_private_imports():
    """`from x import _name` and `import a._b` reach into another module's privates (dunders are public)."""
    offenders = []
    for path in _files():
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.ImportFrom):
                module = _absolute(path, node)
                for part in module.split("."):
                    if _is_private(part):
                        offenders.append(f"{_rel(path)}:{node.lineno}: from {module} import ... (private module {part})")
                        break
                for alias in node.names:
                    if _is_private(alias.name):
                        offenders.append(f"{_rel(path)}:{node.lineno}: from {module} import {alias.name}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if any(_is_private(part) for part in alias.name.split(".")):
                        offenders.append(f"{_rel(path)}:{node.lineno}: import {alias.name}")
    assert not offenders, _report("imports of private names", offenders)


def _function_imports(tree: ast.Module):
    """Import statements anywhere inside a function or method body (nested functions included)."""
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for stmt in fn.body:
                for node in ast.walk(stmt):
                    if isinstance(node, (ast.Import, ast.ImportFrom)):
                        yield fn, node


def test_no_intra_package_imports_in_functions():
    """Imports of rewriter modules sit at module level, where the import graph (and lint-imports) sees them.
    Third-party imports inside functions are fine (optional or heavy dependencies)."""
    offenders = set()
    for path in _files():
        if _rel(path) in FUNCTION_IMPORTS_ALLOWED:
            continue
        for fn, node in _function_imports(_tree(path)):
            if isinstance(node, ast.ImportFrom):
                module = _absolute(path, node)
                if node.level or _is_intra(module):
                    names = ", ".join(a.name for a in node.names)
                    offenders.add((_rel(path), node.lineno, f"in {fn.name}(): from {module} import {names}"))
            else:
                for alias in node.names:
                    if _is_intra(alias.name):
                        offenders.add((_rel(path), node.lineno, f"in {fn.name}(): import {alias.name}"))
    lines = [f"{p}:{n}: {what}" for p, n, what in sorted(offenders)]  # nested functions are walked twice: dedup
    assert not lines, _report("intra-package imports inside functions", lines)


def _bound_names(body: list[ast.stmt]):
    """(name, line, node) for every name bound at module level (not inside function or class bodies)."""
    def targets(t):
        if isinstance(t, ast.Name):
            yield t.id
        elif isinstance(t, (ast.Tuple, ast.List)):
            for e in t.elts:
                yield from targets(e)
        elif isinstance(t, ast.Starred):
            yield from targets(t.value)

    for stmt in body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield stmt.name, stmt.lineno, stmt
        elif isinstance(stmt, ast.Assign):
            for t in stmt.targets:
                for name in targets(t):
                    yield name, stmt.lineno, stmt
        elif isinstance(stmt, (ast.AnnAssign, ast.AugAssign)):
            for name in targets(stmt.target):
                yield name, stmt.lineno, stmt
        elif isinstance(stmt, ast.Import):
            for alias in stmt.names:
                yield alias.asname or alias.name.split(".")[0], stmt.lineno, stmt
        elif isinstance(stmt, ast.ImportFrom):
            for alias in stmt.names:
                yield alias.asname or alias.name, stmt.lineno, stmt
        elif isinstance(stmt, (ast.For, ast.AsyncFor)):
            for name in targets(stmt.target):
                yield name, stmt.lineno, stmt
        elif isinstance(stmt, (ast.With, ast.AsyncWith)):
            for item in stmt.items:
                if item.optional_vars is not None:
                    for name in targets(item.optional_vars):
                        yield name, stmt.lineno, stmt
        if isinstance(stmt, (ast.If, ast.For, ast.AsyncFor, ast.While, ast.With, ast.AsyncWith)):
            yield from _bound_names(stmt.body)
            yield from _bound_names(getattr(stmt, "orelse", []))
        elif isinstance(stmt, ast.Try):
            yield from _bound_names(stmt.body)
            for h in stmt.handlers:
                yield from _bound_names(h.body)
            yield from _bound_names(stmt.orelse)
            yield from _bound_names(stmt.finalbody)


def test_no_name_shadows_a_submodule():
    """In a package's __init__, a module-level name equal to a submodule's name hides that submodule
    (`rewriter.trace` would be a function or a module depending on what was imported first).
    Binding the submodule itself (`from . import checkpoint`) is fine."""
    offenders = []
    for init in sorted(PKG.rglob("__init__.py")):
        pkg_dir = init.parent
        pkg = ".".join(pkg_dir.relative_to(ROOT).parts)
        submodules = {p.stem for p in pkg_dir.glob("*.py") if p.name != "__init__.py"}
        submodules |= {p.name for p in pkg_dir.iterdir() if (p / "__init__.py").is_file()}
        for name, line, stmt in _bound_names(_tree(init).body):
            if name not in submodules:
                continue
            if isinstance(stmt, ast.ImportFrom) and _absolute(init, stmt) == pkg:
                continue  # `from . import name`: the submodule itself
            if isinstance(stmt, ast.Import) and any(a.asname == name and a.name == f"{pkg}.{name}" for a in stmt.names):
                continue  # `import pkg.name as name`
            offenders.append(f"{_rel(init)}:{line}: {name!r} shadows submodule {pkg}.{name}")
    assert not offenders, _report("module-level names shadowing a submodule", offenders)


def _bin(tool: str) -> str:
    path = Path(sys.executable).parent / tool
    if not path.exists():
        pytest.fail(f"{tool} not found next to {sys.executable}: pip install -e '.[test]'")
    return str(path)


def test_import_contracts():
    """The contracts in pyproject.toml ([tool.importlinter]): layers, no peft, no transformers in core/methods."""
    proc = subprocess.run([_bin("lint-imports"), "--no-logo", "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    rc = proc.returncode
    assert rc == 0, f"lint-imports exited {rc}:\n{proc.stdout}\n{proc.stderr}"


def test_mypy():
    """mypy (config: [tool.mypy] in pyproject.toml) over the typed core."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
                           "--cache-dir", str(MYPY_CACHE), "--no-color-output", *MYPY_FILES],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - start
    rc = proc.returncode
    assert rc == 0, f"mypy exited {rc} ({elapsed:.0f} s):\n{proc.stdout}\n{proc.stderr}"
