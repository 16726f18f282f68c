"""A process killed (SIGKILL) in the middle of save_adapter never costs the previous checkpoint.

A forked child saves while the parent kills it: first at every step of the write sequence, made
deterministic by a stand-in for ``os`` inside rewriter.checkpoint that stops the child there
(half-way through writing a file, before its rename, after it), then at random moments while the
child saves a 12 MB adapter over and over.  After every kill the directory must load, and hold
either the old or the new version, never a mix.  Every adapter weight of version ``k`` is ``k``.
"""
import os
import random
import select
import signal
import time

import pytest
import torch

import rewriter
from rewriter.core import files as checkpoint  # where atomic writes call os
from rewriter.core.tracing import trace_model
from tiny_graphs import mlp

SMALL = '[adapter]\nr = 4\ninit = false\n[[rule]]\nname = "all"\nsuffix = ["up", "down"]\n'
BIG = SMALL.replace("r = 4", "r = 1024")  # 3.1M parameters on mlp(256): a 12 MB weights file
# atomic writes in order, per format; a kill after the commit point gives the new version
WRITES = {"rewriter": ["weights", "manifest", "rules.toml"], "peft": ["weights", "adapter_config.json"]}
COMMIT = {"rewriter": (2, "after-rename"), "peft": (1, "after-rename")}
PHASES = ["mid-write", "before-rename", "after-rename"]


class _HalfWriter:
    """A file object that writes half of what it is given, then stops for the kill."""

    def __init__(self, fh, stop):
        self.fh, self.stop = fh, stop

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()

    def write(self, data):
        self.fh.write(data[: len(data) // 2])
        self.fh.flush()
        self.stop()


class _StoppingOS:
    """Stands in for ``os`` in rewriter.checkpoint, in the child only: stops at ``phase`` of the
    ``write``-th atomic write and tells the parent through ``pipe``."""

    def __init__(self, write: int, phase: str, pipe: int):
        self.write, self.phase, self.pipe, self.count = write, phase, pipe, 0

    def __getattr__(self, name):
        return getattr(os, name)

    def stop(self):
        os.write(self.pipe, b"stopped\n")
        time.sleep(600)

    def fdopen(self, fd, mode):
        self.count += 1
        fh = os.fdopen(fd, mode)
        return _HalfWriter(fh, self.stop) if (self.count, self.phase) == (self.write, "mid-write") else fh

    def replace(self, src, dst):
        here = self.count == self.write
        if here and self.phase == "before-rename":
            self.stop()
        os.replace(src, dst)
        if here and self.phase == "after-rename":
            self.stop()


def stamp(adapted, version: int) -> None:
    with torch.no_grad():
        for p in adapted.trainable_parameters():
            p.fill_(float(version))


def fork_saver(adapted, directory, fmt: str, first: int, stop_at=None) -> tuple[int, int]:
    """A child that saves versions first, first + 1, ... (one, stopped at ``stop_at``, if given),
    reporting each completed save on the returned pipe."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        try:
            os.close(read_end)
            if stop_at is not None:
                checkpoint.os = _StoppingOS(*stop_at, write_end)
            version = first
            while True:
                stamp(adapted, version)
                adapted.save_adapter(directory, format=fmt)
                os.write(write_end, f"saved {version}\n".encode())
                version += 1
        finally:
            os._exit(1)
    os.close(write_end)
    return pid, read_end


def kill(pid: int, pipe: int) -> list[str]:
    """SIGKILL the child; return the lines it reported."""
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    data = b""
    while chunk := os.read(pipe, 65536):
        data += chunk
    os.close(pipe)
    return data.decode().split()


def wait_for_stop(pid: int, pipe: int) -> None:
    """Return once the child reports that it stopped; fail if it reports anything else first."""
    ready, _, _ = select.select([pipe], [], [], 120)
    first = os.read(pipe, len(b"stopped\n")) if ready else b""
    if first != b"stopped\n":
        kill(pid, pipe)
        pytest.fail(f"the child did not stop where it was told to (it said {first!r})")


def loaded_version(width: int, directory) -> int:
    """Load the directory onto a fresh model; every adapter weight must hold one version number."""
    fresh = rewriter.Adapted(trace_model(mlp(width)))
    fresh.load_adapter(directory)
    values = torch.cat([p.detach().flatten() for p in fresh.trainable_parameters()])
    assert torch.all(values == values[0]), "the checkpoint mixes two versions"
    return int(values[0])


def leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.parametrize("fmt", ["rewriter", "peft"])
def test_kill_at_every_step_of_a_save_keeps_a_complete_checkpoint(tmp_path, fmt):
    adapted = rewriter.apply(mlp(32), SMALL)
    directory = tmp_path / "ckpt"
    version = 1
    stamp(adapted, version)
    adapted.save_adapter(directory, format=fmt)
    for write in range(1, len(WRITES[fmt]) + 1):
        for phase in PHASES:
            pid, pipe = fork_saver(adapted, directory, fmt, version + 1, stop_at=(write, phase))
            wait_for_stop(pid, pipe)
            kill(pid, pipe)
            committed = (write, PHASES.index(phase)) >= (COMMIT[fmt][0], PHASES.index(COMMIT[fmt][1]))
            point = f"{fmt}: killed at {phase} of write {write} ({WRITES[fmt][write - 1]})"
            assert loaded_version(32, directory) == version + committed, point
            if phase != "after-rename":  # the kill really landed inside a write
                assert leftovers(directory), point
            version += committed
    stamp(adapted, version + 1)
    adapted.save_adapter(directory, format=fmt)  # a clean save clears what the kills left
    expected = {"rewriter": 3, "peft": 2}[fmt]
    assert not leftovers(directory) and len(list(directory.iterdir())) == expected, sorted(os.listdir(directory))
    assert loaded_version(32, directory) == version + 1


def test_kill_at_random_moments_while_saving_a_large_adapter_repeatedly(tmp_path):
    adapted = rewriter.apply(mlp(256), BIG)
    directory = tmp_path / "ckpt"
    stamp(adapted, 1)
    adapted.save_adapter(directory)
    rng = random.Random(0)
    last = 1  # the newest version known to be complete
    for _ in range(8):
        pid, pipe = fork_saver(adapted, directory, "rewriter", last + 1)
        time.sleep(rng.uniform(0.0, 0.5))
        reported = kill(pid, pipe)
        saved = [int(v) for v in reported if v.isdigit()]
        last = max(saved, default=last)
        found = loaded_version(256, directory)
        assert found in (last, last + 1), (found, last)  # the one being written may have committed
        last = found
