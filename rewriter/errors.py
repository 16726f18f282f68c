"""Errors that name what is wrong, where, and what to do."""
from __future__ import annotations


class RewriterError(Exception):
    """Base class: every error rewriter raises on bad input is one of these."""

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        super().__init__(self.render())

    def render(self) -> str:
        text = f"{self.where}: {self.what}" if self.where else self.what
        return f"{text}\n  fix: {self.fix}" if self.fix else text


class ConfigError(RewriterError):
    """A method parameter is invalid (raised by config dataclasses; rules add the location)."""

    def __init__(self, what: str, *, field: str | None = None, fix: str | None = None):
        self.field = field
        super().__init__(what, fix=fix)


class RuleError(RewriterError):
    """A rule file is malformed or a rule cannot be satisfied."""


class TraceError(RewriterError):
    """A model could not be traced into a graph."""


class CheckpointError(RewriterError):
    """An adapter checkpoint is missing, malformed or does not fit the model."""


class MergeError(RewriterError):
    """A merge was refused (non-mergeable adapter, non-finite values, unsafe order)."""
