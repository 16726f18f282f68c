"""Data-parallel training of an Adapted model: two CPU processes (gloo), started with torchrun, train
the same adapter weights as one process on the whole global batch.

tests/dist_worker.py does the distributed part, once with DDP and once with FSDP2 (fully_shard), and
reports what each rank saw; see docs/distributed.md for the same on a GPU cluster.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import dist_worker
import rewriter
from rewriter.core.tolerance import ROUNDINGS, unit_roundoff
from rewriter.core.tracing import trace_model
from tiny_graphs import mlp

STEPS = 8
WORLD = 2


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
                           dist_worker.__file__, str(out), "--steps", str(STEPS)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return out, ranks


@pytest.fixture(scope="module")
def reference():
    return dist_worker.reference(STEPS)


def tolerance(reference: dict) -> float:
    """Two processes sum the same gradients in another order: a few roundings per step, each relative
    u * sqrt(samples), on weights of this size, accumulated over the steps."""
    scale = max(t.abs().max().item() for t in reference.values())
    return STEPS * ROUNDINGS * unit_roundoff(torch.float32) * math.sqrt(dist_worker.GLOBAL_BATCH) * scale


def loaded(directory) -> dict:
    a = rewriter.Adapted(trace_model(mlp(dist_worker.WIDTH)))
    a.load_adapter(directory)
    return dist_worker.adapter_state(a)


def test_training_moves_the_adapter_far_beyond_the_tolerance(reference):
    start = dist_worker.adapter_state(dist_worker.build())
    moved = max((reference[n] - start[n]).abs().max().item() for n in start)
    assert moved > 1000 * tolerance(reference)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_train_what_one_process_trains_on_the_global_batch(run, reference, strategy):
    out, _ = run
    trained = loaded(out / strategy)
    assert trained.keys() == reference.keys()
    worst = max((trained[n] - reference[n]).abs().max().item() for n in reference)
    assert worst <= tolerance(reference), (strategy, worst, tolerance(reference))


def test_ddp_synchronises_only_the_adapter_parameters(run):
    _, ranks = run
    for rank in ranks:
        ddp = rank["ddp"]
        assert ddp["reduced"] == ddp["trainable"] and ddp["frozen"] > 0
        assert all(".rewriter_adapters.default." in name for name in ddp["reduced"])


def test_only_rank_0_writes_the_checkpoints(run):
    out, ranks = run
    assert {r["rank"]: sorted(r["wrote"]) for r in ranks} == {
        0: sorted(str(p.relative_to(out)) for d in ("ddp", "fsdp") for p in (out / d).iterdir()), 1: []}


def test_fsdp2_shards_every_parameter(run):
    _, ranks = run
    total = sum(1 for _ in dist_worker.build().parameters())
    assert all(r["fsdp2"]["sharded"] == total for r in ranks)
