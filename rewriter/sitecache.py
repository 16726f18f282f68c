"""A cache of what ``rewriter explain`` reads from a traced model: its sites, the names of its modules,
and graph-scope methods' targets.

Iterating on a rule file means running ``explain`` many times on one model, and tracing is most of its
time (seconds, growing with depth).  The cache keys on everything the trace depends on: the model
(a Hugging Face directory's ``*.json``/``*.py`` files, a factory module's source, a builtin's name), the
torch, transformers and rewriter sources, and the trace options.  Weights are not part of the key: sites
depend on shapes, which the config fixes.  A factory that builds its model from files other than its own
module is not tracked: ``--no-cache`` retraces.

Entries are pickles written by this process family only (``$REWRITER_CACHE_DIR``, default
``~/.cache/rewriter``), written to a temp file and renamed; an unreadable entry is a miss.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import pickle
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .methods import get_method

FORMAT = 1  # bump when what is stored changes


def cache_dir() -> Path:
    root = os.environ.get("REWRITER_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rewriter"


@dataclass
class SiteTable:
    """The model facts rules are planned against, without the graph: ``targets`` and
    ``module_names`` answer as :class:`rewriter.Adapted`'s methods of the same names do."""
    sites: dict[str, Any]
    modules: list[str]
    graph_targets: dict[str, dict[str, Any]] = field(default_factory=dict)

    def targets(self, method: str) -> dict[str, Any]:
        if get_method(method).graph_scope is None:
            return self.sites
        return self.graph_targets[method]

    def has(self, method: str) -> bool:
        return get_method(method).graph_scope is None or method in self.graph_targets

    def module_names(self) -> list[str]:
        return self.modules

    def add(self, adapted, method: str) -> None:
        """Record ``method``'s targets on ``adapted`` when they can be stored (Llama-Adapter's attention
        blocks can; X-LoRA's depend on the adapters loaded, so it is always traced)."""
        targets = adapted.targets(method)
        if targets is self.sites or targets is adapted.sites:
            return
        try:
            pickle.dumps(targets)
        except (pickle.PicklingError, TypeError, AttributeError):
            return
        self.graph_targets[method] = dict(targets)


def model_key(spec: str, **options) -> str | None:
    """The cache key of model ``spec`` traced with ``options``; None when the spec's source cannot be
    fingerprinted (it then always traces)."""
    source = _model_fingerprint(spec)
    if source is None:
        return None
    h = hashlib.sha256()
    for part in (str(FORMAT), spec, repr(sorted(options.items())), source, _versions(), _package_fingerprint()):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def load(key: str) -> SiteTable | None:
    try:
        with open(cache_dir() / "sites" / f"{key}.pkl", "rb") as f:
            table = pickle.load(f)
    except Exception:  # missing, truncated, or from an incompatible version: trace instead
        return None
    return table if isinstance(table, SiteTable) else None


def store(key: str, table: SiteTable) -> None:
    """Write atomically; a cache that cannot be written (read-only home) is not an error."""
    directory = cache_dir() / "sites"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{key}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                pickle.dump(table, f, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(tmp, directory / f"{key}.pkl")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError:
        pass


def _model_fingerprint(spec: str) -> str | None:
    if spec.startswith("builtin:"):
        return spec  # built by rewriter's own code, which the package fingerprint covers
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".json", ".py"))
        return _files_digest(files) + "".join(f"{p.name}:{p.stat().st_size};" for p in sorted(path.iterdir())
                                              if p.suffix in (".safetensors", ".bin"))
    if ":" in spec:
        module = spec.partition(":")[0]
        try:
            found = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            return None
        if found is None or not found.origin or not os.path.isfile(found.origin):
            return None
        return _files_digest([Path(found.origin)])
    return None


def _files_digest(files) -> str:
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def _versions() -> str:
    parts = []
    for dist in ("torch", "transformers"):
        try:
            parts.append(f"{dist}={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{dist}=none")
    return ",".join(parts)


def _package_fingerprint() -> str:
    """rewriter's own sources by size and modification time: an edit to site finding invalidates."""
    root = Path(__file__).parent
    return ";".join(f"{p.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}"
                    for p in sorted(root.rglob("*.py")) for st in [p.stat()])
