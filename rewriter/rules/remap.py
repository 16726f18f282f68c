"""``[remap]`` tables: explicit renames of module names in checkpoints."""
from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from ..errors import RuleError


@dataclass(frozen=True)
class Remap:
    """An explicit rename table for module names in checkpoints (``[remap]`` in a rule file):
    ``"old.prefix" = "new.prefix"``, matched on whole name components, the longest prefix first.
    It lets an adapter trained on one module layout load on a renamed one."""
    pairs: tuple[tuple[str, str], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.pairs)

    def apply(self, name: str) -> str:
        for old, new in sorted(self.pairs, key=lambda pair: -len(pair[0])):
            if name == old or name.startswith(old + "."):
                return new + name[len(old):]
        return name


def parse_remap(table, where: str) -> Remap:
    if not isinstance(table, Mapping):
        raise RuleError("[remap] must be a table of \"old.name\" = \"new.name\"", where=where)
    pairs = []
    for old, new in table.items():
        for value in (old, new):
            if not isinstance(value, str) or not value or value.startswith(".") or value.endswith(".") \
                    or ".." in value:
                raise RuleError(f"[remap] entry {old!r} = {new!r}: both sides must be module names or name prefixes "
                                "like \"transformer.h\"", where=f"{where}, [remap]",
                                fix='e.g. "transformer.h" = "model.layers"')
        pairs.append((old, new))
    return Remap(tuple(pairs))


def read_remap(source) -> Remap:
    """A Remap from a Remap, a dict, or a TOML file with a ``[remap]`` table (a rule file or a
    file of its own)."""
    if source is None or isinstance(source, Remap):
        return source or Remap()
    if isinstance(source, Mapping):
        return parse_remap(source, "<remap>")
    path = Path(source)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise RuleError(f"cannot read remap file: {exc}", where=str(path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise RuleError(f"invalid TOML: {exc}", where=str(path)) from None
    if "remap" not in data:
        raise RuleError("no [remap] table in this file", where=str(path),
                        fix='add one: [remap] then lines like "transformer.h" = "model.layers"')
    return parse_remap(data["remap"], str(path))
