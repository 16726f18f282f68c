"""X-LoRA eval forward, rewriter vs PEFT 0.21.2, on compare_peft.py's standard Llama setting.

Three LoRA experts (r 8 on q, k, v, o, gate, up, down), PEFT's default XLoraConfig, the same
classifier weights on both sides.  Median over paired repeats (after warm-ups) of process CPU
time, one thread; the ratio column is ours / PEFT.  One run:

    python bench/xlora_forward.py            # standard setting (~1-2 min)
    python bench/xlora_forward.py --quick    # tiny sizes, a smoke run
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_peft import (ALL_LINEAR, QUICK, STANDARD, build_model, make_inputs, median_cpu,  # noqa: E402
                          median_ratio, rounds, timed)

from rewriter.adapted import Adapted  # noqa: E402
from rewriter.tolerance import output_tolerance  # noqa: E402
from rewriter.trace import trace_model  # noqa: E402

EXPERTS = 3
CLASSIFIER = "base_model.internal_xlora_classifier."


def save_experts(model, directory: Path) -> dict[str, str]:
    from peft import LoraConfig, get_peft_model
    paths = {}
    for i in range(EXPERTS):
        torch.manual_seed(10 + i)
        expert = get_peft_model(copy.deepcopy(model), LoraConfig(r=8, lora_alpha=16, target_modules=ALL_LINEAR,
                                                                 init_lora_weights=False))
        expert.save_pretrained(directory / str(i))
        paths[str(i)] = str(directory / str(i))
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    setting = QUICK if parser.parse_args(argv).quick else STANDARD
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    from peft import XLoraConfig, get_peft_model
    model = build_model(setting)
    inputs = make_inputs(setting)
    with tempfile.TemporaryDirectory() as tmp:
        paths = save_experts(model, Path(tmp))
        peft_base = copy.deepcopy(model)
        peft_base.config.use_cache = False
        torch.manual_seed(0)
        theirs = get_peft_model(peft_base, XLoraConfig(task_type="CAUSAL_LM", hidden_size=setting.hidden,
                                                       adapters=paths)).eval()
        ours = Adapted(trace_model(model))
        rules = ('schema = 1\n[adapter]\nmethod = "xlora"\n[adapter.adapters]\n'
                 + "".join(f'"{k}" = "{v}"\n' for k, v in paths.items()))
        ours.add_adapter(rules, "xlora")
    classifier = {k[len(CLASSIFIER):]: v for k, v in theirs.state_dict().items() if k.startswith(CLASSIFIER)}
    ours.adapters["xlora"].modules["model"].classifier.load_state_dict(classifier)

    def forward(m):
        def run():
            with torch.no_grad():
                return m(**inputs).logits
        return run

    expected, got = forward(theirs)(), forward(ours)()
    error = (got - expected).abs().max().item()
    times = rounds({"base": lambda: timed(forward(model))},
                   {"xlora": [("ours", lambda: timed(forward(ours))), ("peft", lambda: timed(forward(theirs)))]},
                   setting.warmups, setting.repeats)
    base, mine, peft = times[("base", "base")], times[("xlora", "ours")], times[("xlora", "peft")]
    print(f"setting: hidden {setting.hidden}, {setting.layers} layers, batch {setting.batch} x seq {setting.seq}; "
          f"{EXPERTS} experts r 8 on {len(ALL_LINEAR)} projections; median of {setting.repeats} after "
          f"{setting.warmups} warm-ups, CPU time, 1 thread")
    print(f"parity: max |ours - PEFT| = {error:.2e} (tolerance {output_tolerance(expected, torch.float32):.2e})")
    print(f"base model forward     {median_cpu(base) * 1e3:8.1f} ms")
    print(f"X-LoRA forward, ours   {median_cpu(mine) * 1e3:8.1f} ms")
    print(f"X-LoRA forward, PEFT   {median_cpu(peft) * 1e3:8.1f} ms")
    print(f"ratio ours / PEFT      {median_ratio(mine, peft):8.2f}")
    return 0 if error <= output_tolerance(expected, torch.float32) else 1


if __name__ == "__main__":
    sys.exit(main())
