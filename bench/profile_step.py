"""One training step of a compare_peft.py method under torch.profiler: ours, PEFT's and the frozen
base's, each as top aten ops by self CPU time, and matmuls split by shape.  Built exactly like the
benchmark's pairs (standard setting, one thread, after two warm-up steps).

    python bench/profile_step.py xlora            # or any other compare_peft method
    python bench/profile_step.py lora --quick --rows 10
"""
from __future__ import annotations

import argparse
import collections
import tempfile
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from compare_peft import METHODS, QUICK, STANDARD, Base, base_side, build_model, is_xlora, make_inputs, make_pair, \
    save_xlora_experts
from rewriter.core.tracing import trace_model

WARMUP_STEPS = 2


def matmul_split(events) -> dict[str, tuple[float, int]]:
    """Self CPU ms and calls of aten::mm by its (M, K) x (K, N) shapes, largest first."""
    split = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.key == "aten::mm":
            entry = split[" x ".join(str(tuple(s)) for s in e.input_shapes if s)]
            entry[0] += e.self_cpu_time_total / 1e3
            entry[1] += e.count
    return dict(sorted(((k, tuple(v)) for k, v in split.items()), key=lambda kv: -kv[1][0]))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", choices=list(METHODS))
    parser.add_argument("--quick", action="store_true", help="compare_peft's tiny setting")
    parser.add_argument("--rows", type=int, default=15, help="top ops to print per side")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    setting = QUICK if args.quick else STANDARD
    model, inputs = build_model(setting), make_inputs(setting)
    traced = trace_model(model)
    with tempfile.TemporaryDirectory() as tmp:
        experts = save_xlora_experts(model, Path(tmp)) if is_xlora(args.method) else {}
        pair = make_pair(args.method, Base(model, traced, inputs, experts), Path(tmp))
    for side in (pair.ours, pair.peft):
        side.module.train()
    for name, side in (("ours", pair.ours), ("peft", pair.peft), ("frozen base", base_side(model, inputs))):
        for _ in range(WARMUP_STEPS):
            side.train_step()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            side.train_step()
        events = prof.key_averages(group_by_input_shape=True)
        print(f"\n==== {args.method}, {name}: one train step, {sum(e.self_cpu_time_total for e in events) / 1e3:.0f} ms "
              "self CPU (profiler overhead included)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows,
                                        max_name_column_width=40))
        print("aten::mm by shape: self CPU ms, calls")
        for shapes, (ms, calls) in list(matmul_split(events).items())[:args.rows]:
            print(f"  {shapes:50s} {ms:8.1f} {calls:5d}")


if __name__ == "__main__":
    main()
