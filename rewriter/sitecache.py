"""A cache of what ``rewriter explain`` reads from a traced model: its sites, the names of its modules,
and graph-scope methods' targets.

Iterating on a rule file means running ``explain`` many times on one model, and tracing is most of its
time (seconds, growing with depth).  The cache keys on everything the trace depends on: the model
(a Hugging Face directory's ``*.json``/``*.py`` files, a factory module's source, a builtin's name), the
torch, transformers and rewriter sources, and the trace options.  Weights are not part of the key: sites
depend on shapes, which the config fixes.  A factory that builds its model from files other than its own
module is not tracked: ``--no-cache`` retraces.

Entries are plain JSON (``$REWRITER_CACHE_DIR/sites/<key>.json``, default ``~/.cache/rewriter``), written
to a temp file and renamed.  A cache can be restored in CI or shared between users, so an entry is
untrusted data: it is read by checking every field (types, sizes, dtype names from an allow-list), and
anything that is not exactly what this version writes (garbled or truncated JSON, another format or
version, an entry copied from another key, a pickle ``.pkl`` from older versions) is a miss and the model
is traced.  Nothing in an entry is imported, called or unpickled.  Only sites and Llama-Adapter's
attention blocks are stored; X-LoRA's targets depend on the adapters loaded and are always traced.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .core.files import atomic_write
from .core.sites import Site
from .errors import CheckpointError, RewriterError
from .methods import get_method
from .methods.adaption_prompt.find import Attention, Projection, SiteResult

FORMAT = 2  # bump when what is stored changes
KIND = "rewriter-site-cache"
MAX_ENTRY_BYTES = 64 << 20  # far above any model's table (a 100-layer model: a few MB)
_MAX_SIZE = 1 << 31         # feature counts, channels, heads: anything larger is not a real model
#: the dtypes a weight may have, by name: an entry names one of these or is a miss
DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in (
    "float16", "bfloat16", "float32", "float64", "float8_e4m3fn", "float8_e5m2", "int8", "uint8")
    if isinstance(getattr(torch, name, None), torch.dtype)}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
#: what is stored of each class, field by field; a class that gains a field is not cached until this learns it
SITE_FIELDS = ("name", "weight", "bias", "op", "in_features", "out_features", "layer", "dtype", "nodes",
               "module_type")
ATTENTION_FIELDS = ("name", "weight", "in_features", "out_features", "dtype", "node", "heads", "kv_heads",
                    "head_dim", "scale", "keys", "values", "output", "output_conv1d", "problem", "bias")
PROJECTION_FIELDS = ("result", "input", "flat_input", "channels")
SITE_RESULT_FIELDS = ("site", "reader", "arg")


def cache_dir() -> Path:
    root = os.environ.get("REWRITER_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rewriter"


def entry_path(key: str) -> Path:
    return cache_dir() / "sites" / f"{key}.json"


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
        if _fields_known(Attention, ATTENTION_FIELDS) and all(
                type(t) is Attention and _attention_storable(t) for t in targets.values()):
            self.graph_targets[method] = dict(targets)


class Malformed(ValueError):
    """An entry that is not what this version writes: read as a cache miss."""


# ---- the key ------------------------------------------------------------------------------------

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


# ---- reading and writing entries ----------------------------------------------------------------

def load(key: str) -> SiteTable | None:
    """The entry for ``key``, or None (a miss) when there is none or it is anything but a valid entry."""
    try:
        return table_from_json(json.loads(_read_entry(entry_path(key)), object_pairs_hook=_unique_keys,
                                          parse_constant=_no_constant), key)
    except (OSError, ValueError, RecursionError):  # missing, garbled, foreign, nested without end
        return None


def store(key: str, table: SiteTable) -> None:
    """Write atomically; a cache that cannot be written (read-only home) or a table with something this
    format cannot hold is not an error, only no entry."""
    try:
        data = json.dumps(table_to_json(table, key), allow_nan=False, separators=(",", ":")).encode()
        atomic_write(entry_path(key), data)
    except (OSError, ValueError, CheckpointError):  # CheckpointError: atomic_write's report of an OSError
        pass


def _read_entry(path: Path) -> bytes:
    """The bytes of a regular file no larger than MAX_ENTRY_BYTES (a FIFO or device planted at the
    path would block or never end)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_ENTRY_BYTES:
            raise Malformed("not a regular file of a plausible size")
        data = f.read(MAX_ENTRY_BYTES + 1)
    if len(data) > MAX_ENTRY_BYTES:
        raise Malformed("grew while read")
    return data


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise Malformed("a key appears twice")
    return out


def _no_constant(name: str):
    raise Malformed(f"{name} is not a value this format writes")


def table_to_json(table: SiteTable, key: str) -> dict[str, Any]:
    if not (_fields_known(Site, SITE_FIELDS) and _fields_known(Attention, ATTENTION_FIELDS)):
        raise Malformed("a stored class changed its fields")
    return {"kind": KIND, "format": FORMAT, "key": key,
            "sites": [site_to_json(s) for s in table.sites.values()],
            "modules": list(table.modules),
            "graph_targets": {method: [attention_to_json(t) for t in targets.values()]
                              for method, targets in table.graph_targets.items()}}


def table_from_json(data: Any, key: str) -> SiteTable:
    entry = _record(data, ("kind", "format", "key", "sites", "modules", "graph_targets"))
    if entry["kind"] != KIND or type(entry["format"]) is not int or entry["format"] != FORMAT or entry["key"] != key:
        raise Malformed("another format, version or key")
    if not (_fields_known(Site, SITE_FIELDS) and _fields_known(Attention, ATTENTION_FIELDS)):
        raise Malformed("a stored class changed its fields")
    sites = _by_name([site_from_json(s) for s in _list(entry["sites"])])
    modules = [_text(m) for m in _list(entry["modules"])]
    graph_targets = {}
    for method, targets in _dict(entry["graph_targets"]).items():
        try:
            scoped = get_method(method).graph_scope is not None
        except RewriterError:
            scoped = False
        if not scoped:
            raise Malformed(f"'{method}' is not a graph-scope method")
        graph_targets[method] = _by_name([attention_from_json(t) for t in _list(targets)])
    return SiteTable(sites, modules, graph_targets)


# ---- field by field ------------------------------------------------------------------------------

def site_to_json(site: Site) -> dict[str, Any]:
    if type(site) is not Site or site.dtype not in _DTYPE_NAMES:
        raise Malformed(f"site {site!r} cannot be stored")
    return {"name": site.name, "weight": site.weight, "bias": site.bias, "op": site.op,
            "in_features": site.in_features, "out_features": site.out_features, "layer": site.layer,
            "dtype": _DTYPE_NAMES[site.dtype], "nodes": list(site.nodes), "module_type": site.module_type}


def site_from_json(data: Any) -> Site:
    d = _record(data, SITE_FIELDS)
    if d["op"] not in ("linear", "conv1d"):
        raise Malformed(f"unknown op {d['op']!r}")
    return Site(name=_text(d["name"]), weight=_text(d["weight"]), bias=_text(d["bias"], optional=True), op=d["op"],
                in_features=_size(d["in_features"]), out_features=_size(d["out_features"]),
                layer=_size(d["layer"], optional=True), dtype=_dtype(d["dtype"]),
                nodes=tuple(_text(n) for n in _list(d["nodes"])), module_type=_text(d["module_type"], empty=True))


def attention_to_json(target: Attention) -> dict[str, Any]:
    if not _attention_storable(target):
        raise Malformed(f"target {target!r} cannot be stored")
    return {"name": target.name, "weight": target.weight, "in_features": target.in_features,
            "out_features": target.out_features, "dtype": _DTYPE_NAMES[target.dtype], "node": target.node,
            "heads": target.heads, "kv_heads": target.kv_heads, "head_dim": target.head_dim, "scale": target.scale,
            "keys": _projection_to_json(target.keys), "values": _projection_to_json(target.values),
            "output": _site_result_to_json(target.output), "output_conv1d": target.output_conv1d,
            "problem": target.problem}


def attention_from_json(data: Any) -> Attention:
    d = _record(data, tuple(f for f in ATTENTION_FIELDS if f != "bias"))  # bias is always None: not stored
    if type(d["output_conv1d"]) is not bool:
        raise Malformed("output_conv1d is not a boolean")
    return Attention(name=_text(d["name"]), weight=_text(d["weight"]), in_features=_size(d["in_features"]),
                     out_features=_size(d["out_features"]), dtype=_dtype(d["dtype"]), node=_text(d["node"], empty=True),
                     heads=_size(d["heads"]), kv_heads=_size(d["kv_heads"]), head_dim=_size(d["head_dim"]),
                     scale=_scale(d["scale"]), keys=_projection_from_json(d["keys"]),
                     values=_projection_from_json(d["values"]), output=_site_result_from_json(d["output"]),
                     output_conv1d=d["output_conv1d"], problem=_text(d["problem"], optional=True, empty=True))


def _attention_storable(t: Attention) -> bool:
    parts = [p for p in (t.keys, t.values) if p is not None]
    return (t.bias is None and t.dtype in _DTYPE_NAMES and all(type(p) is Projection for p in parts)
            and all(type(r) is SiteResult for r in [p.result for p in parts] + [t.output] if r is not None)
            and _fields_known(Projection, PROJECTION_FIELDS) and _fields_known(SiteResult, SITE_RESULT_FIELDS))


def _projection_to_json(p: Projection | None) -> dict[str, Any] | None:
    if p is None:
        return None
    return {"result": _site_result_to_json(p.result), "input": p.input, "flat_input": p.flat_input,
            "channels": list(p.channels)}


def _projection_from_json(data: Any) -> Projection | None:
    if data is None:
        return None
    d = _record(data, PROJECTION_FIELDS)
    channels = _list(d["channels"])
    if len(channels) != 2 or type(d["flat_input"]) is not bool or d["result"] is None:
        raise Malformed("a projection needs a result, a boolean flat_input and [start, stop) channels")
    start, stop = _size(channels[0]), _size(channels[1])
    if start > stop:
        raise Malformed("channels end before they start")
    return Projection(result=_site_result_from_json(d["result"]), input=_text(d["input"]),
                      flat_input=d["flat_input"], channels=(start, stop))


def _site_result_to_json(r: SiteResult | None) -> dict[str, Any] | None:
    return None if r is None else {"site": r.site, "reader": r.reader, "arg": r.arg}


def _site_result_from_json(data: Any) -> SiteResult | None:
    if data is None:
        return None
    d = _record(data, SITE_RESULT_FIELDS)
    return SiteResult(site=_text(d["site"]), reader=_text(d["reader"]), arg=_size(d["arg"]))


# ---- checks on what is read ----------------------------------------------------------------------

def _fields_known(cls, names: tuple[str, ...]) -> bool:
    return tuple(f.name for f in dataclasses.fields(cls)) == names


def _record(value: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    if type(value) is not dict or set(value) != set(keys):
        raise Malformed(f"expected an object with exactly the keys {', '.join(keys)}")
    return value


def _dict(value: Any) -> dict[str, Any]:
    if type(value) is not dict:
        raise Malformed("expected an object")
    return value


def _list(value: Any) -> list[Any]:
    if type(value) is not list:
        raise Malformed("expected a list")
    return value


def _text(value: Any, *, optional: bool = False, empty: bool = False):
    if value is None and optional:
        return None
    if type(value) is not str or not (value or empty) or "\0" in value:
        raise Malformed("expected a non-empty string")
    return value


def _size(value: Any, *, optional: bool = False):
    if value is None and optional:
        return None
    if type(value) is not int or not 0 <= value < _MAX_SIZE:
        raise Malformed(f"expected a size in [0, {_MAX_SIZE}), found {value!r}")
    return value


def _scale(value: Any) -> float:
    if type(value) not in (int, float) or not 0 <= value < _MAX_SIZE:
        raise Malformed("expected a finite non-negative scale")
    return float(value)


def _dtype(value: Any) -> torch.dtype:
    if type(value) is not str or value not in DTYPES:
        raise Malformed(f"unknown dtype {value!r}")
    return DTYPES[value]


def _by_name(items: list[Any]) -> dict[str, Any]:
    out = {item.name: item for item in items}
    if len(out) != len(items):
        raise Malformed("a name appears twice")
    return out
