"""Data-parallel training of an ``Adapted`` model, one process per rank; started by torchrun.

    torchrun --standalone --nproc_per_node=2 tests/dist_worker.py OUT                    # CPU, gloo
    torchrun --nnodes=2 --nproc_per_node=8 ... tests/dist_worker.py OUT --backend nccl   # one GPU per rank

Every rank builds the same tiny model and adapter (same seeds) and trains on its contiguous share of
each global batch, first under DDP (rank 0 saves ``OUT/ddp``), then under FSDP2 (``fully_shard``;
the sharded adapter weights are gathered by all ranks, rank 0 saves ``OUT/fsdp``).  Each rank writes
``OUT/rank<r>.json``: what DDP all-reduced, what FSDP2 sharded, which files the rank wrote.
``reference(steps)`` trains in one process on the whole global batch, for comparison.
See docs/distributed.md; tests/test_distributed.py runs it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tiny_graphs, when run as a script
import rewriter  # noqa: E402
from rewriter.core import files as checkpoint  # noqa: E402  (atomic writes)
from rewriter.core.graph import ADAPTERS_ATTR  # noqa: E402
from tiny_graphs import mlp  # noqa: E402

RULES = '[adapter]\nr = 4\nalpha = 8\ninit = false\n[[rule]]\nname = "mlp"\nsuffix = ["up", "down"]\n'
WIDTH, GLOBAL_BATCH, LR = 32, 16, 0.05


def build(device: str = "cpu") -> rewriter.Adapted:
    """The same base weights and adapter initialisation on every rank (adapters live on the weights' device)."""
    adapted = rewriter.apply(mlp(WIDTH, seed=0).to(device), RULES)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in adapted.trainable_parameters():
            p.copy_(torch.randn(p.shape) * 0.1)
    return adapted.train()


def data(steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(steps, GLOBAL_BATCH, WIDTH, generator=g), torch.randn(steps, GLOBAL_BATCH, 4, generator=g)


def train(model, params, xs, ys) -> None:
    opt = torch.optim.SGD(params, lr=LR)
    for x, y in zip(xs, ys):
        loss = torch.nn.functional.mse_loss(model(x), y)  # the mean over this rank's share
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def adapter_state(adapted) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in adapted.named_parameters() if ADAPTERS_ATTR in n}


def reference(steps: int) -> dict[str, torch.Tensor]:
    adapted = build()
    train(adapted, adapted.trainable_parameters(), *data(steps))
    return adapter_state(adapted)


def share(steps: int, rank: int, world: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    per = GLOBAL_BATCH // world
    return tuple(t[:, rank * per:(rank + 1) * per].to(device) for t in data(steps))


def run_ddp(out: Path, steps: int, rank: int, world: int, device: str) -> dict:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    adapted = build(device)  # set adapters, merge state etc. first: DDP fixes its parameter list here
    ddp = DDP(adapted, device_ids=None if device == "cpu" else [torch.device(device).index],
              forward_sync_buffers=False)
    names = {p.data_ptr(): n for n, p in adapted.named_parameters()}
    reduced: set[str] = set()

    def recording_allreduce(state, bucket):  # every gradient DDP synchronises passes through here
        reduced.update(names[p.data_ptr()] for p in bucket.parameters())
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, recording_allreduce)
    train(ddp, adapted.trainable_parameters(), *share(steps, rank, world, device))
    if rank == 0:
        adapted.save_adapter(out / "ddp")
    dist.barrier()
    trainable = sorted(n for n, p in adapted.named_parameters() if p.requires_grad)
    return {"reduced": sorted(reduced), "trainable": trainable,
            "frozen": sum(1 for p in adapted.parameters() if not p.requires_grad)}


def run_fsdp2(out: Path, steps: int, rank: int, world: int, device: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    adapted = build(device)
    fully_shard(adapted.gm, mesh=init_device_mesh(device.split(":")[0], (world,)))
    sharded = sum(isinstance(p, DTensor) for p in adapted.parameters())
    train(adapted, adapted.trainable_parameters(), *share(steps, rank, world, device))
    # gathering the shards is collective: every rank takes part, only rank 0 writes
    full = {n: p.full_tensor() for n, p in adapted.named_parameters() if ADAPTERS_ATTR in n}
    if rank == 0:
        unsharded = build()
        with torch.no_grad():
            for n, p in unsharded.named_parameters():
                if n in full:
                    p.copy_(full[n])
        unsharded.save_adapter(out / "fsdp")
    dist.barrier()
    return {"sharded": sharded}


def record_writes(out: Path) -> list[str]:
    """For the test: the files this process writes through rewriter's atomic writes, relative to ``out``."""
    wrote, write = [], checkpoint.atomic_write

    def recording(path, data):
        wrote.append(str(Path(path).relative_to(out)))
        write(path, data)

    checkpoint.atomic_write = recording
    return wrote


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--backend", default="gloo", help="gloo (CPU) or nccl (one GPU per rank)")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if args.backend == "nccl" else "cpu"
    if device != "cpu":
        torch.cuda.set_device(device)
    wrote = record_writes(args.out)
    result = {"rank": rank, "world": world, "ddp": run_ddp(args.out, args.steps, rank, world, device),
              "fsdp2": run_fsdp2(args.out, args.steps, rank, world, device), "wrote": wrote}
    (args.out / f"rank{rank}.json").write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
