"""Long runs and repeated operations: no drift, no growth.

* 100 merge/unmerge cycles with every mergeable method stacked on one site leave the weights, the
  adapters and both outputs bit-identical (merging never writes into the model's parameters);
* ``merge(safe=True)`` names the site that produced a non-finite value, whatever the method, also
  when finite adapter weights overflow the base dtype, and leaves the model untouched;
* 2,000 training steps with merge/unmerge, set_adapter and disable churn grow neither the process's
  resident memory (generous bound) nor the number of live tensors.
"""
import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rewriter
from rewriter import MergeError
from rewriter.check import perturb
from rewriter.core.graph import ADAPTERS_ATTR
from rewriter.core.tracing import trace_model
from tiny_graphs import mlp

#: every mergeable method, bottom to top (MiSS "bat" reads the layer weight, so it goes lowest)
STACK = {
    "bat": 'method = "miss"\nr = 4\ninit_weights = "bat"',
    "lora": 'method = "lora"\nr = 2',
    "loha": 'method = "loha"\nr = 2',
    "lokr": 'method = "lokr"\nr = 2',
    "adalora": 'method = "adalora"\ninit_r = 2\ntarget_r = 1\ntotal_step = 10',
    "fourierft": 'method = "fourierft"\nn_frequency = 16',
    "miss": 'method = "miss"\nr = 4',
    "mini": 'method = "miss"\nr = 4\ninit_weights = "mini"\nmini_r = 2',
    "ia3": 'method = "ia3"',
    "oft": 'method = "oft"\noft_block_size = 4\nr = 0',
    "boft": 'method = "boft"\nboft_block_size = 4',
}
ROOT = Path(__file__).resolve().parents[1]
SITE = "layers.0.up"
X = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))


def stacked() -> rewriter.Adapted:
    """mlp(16, 1) with one adapter per method on layers.0.up, all active, away from their no-op init."""
    a = rewriter.Adapted(trace_model(mlp(16, 1)))
    for name, params in STACK.items():
        a.add_adapter(f'[adapter]\n{params}\n[[rule]]\nname = "up"\nsuffix = ["up"]\n', name)
    a.set_adapter(list(STACK))
    perturb(a, seed=0, scale=0.1)
    return a


def state(a) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in a.named_parameters()}


def out(a, x=X) -> torch.Tensor:
    with torch.no_grad():
        return a(x)


def test_every_mergeable_method_is_in_the_stack():
    mergeable = {name for name, spec in rewriter.METHODS.items() if spec.module_cls.not_mergeable is None}
    assert mergeable <= {params.split('"')[1] for params in STACK.values()}


def test_100_merge_unmerge_cycles_are_bit_identical_for_every_method():
    a = stacked()
    before, unmerged = state(a), out(a)
    a.merge()
    merged = out(a)
    assert not torch.equal(merged, out(rewriter.Adapted(trace_model(mlp(16, 1)))))  # the stack does something
    for _ in range(100):
        a.unmerge()
        a.merge()
    assert torch.equal(out(a), merged)
    a.unmerge()
    assert torch.equal(out(a), unmerged)
    after = state(a)
    assert after.keys() == before.keys() and all(torch.equal(after[n], p) for n, p in before.items())


@pytest.mark.parametrize("method", sorted(STACK))
def test_safe_merge_names_the_site_whatever_the_method(method):
    a = stacked()
    a.merge(["bat", "lora"])  # a merged prefix that must survive the refusal
    output = out(a)
    param = next(iter(a.adapters[method].modules[SITE].parameters()))
    original = param.view(-1)[0].item()
    with torch.no_grad():
        param.view(-1)[0] = float("nan")
    with pytest.raises(MergeError, match=f"'{SITE}'"):
        a.merge(safe=True)
    assert a.merged == ["bat", "lora"]
    with torch.no_grad():
        param.view(-1)[0] = original
    assert torch.equal(out(a), output)


def test_safe_merge_names_the_site_whose_finite_adapter_overflows_a_half_precision_weight(traced_models):
    rules = '[adapter]\nr = 2\nalpha = 2\n[[rule]]\nname = "qv"\nsuffix = ["q_proj", "v_proj"]\n'
    a = rewriter.apply(traced_models("tiny-llama", torch.float16), rules)
    site = "model.layers.1.self_attn.v_proj"
    module = a.adapters["default"].modules[site]
    with torch.no_grad():  # float32 adapter weights, finite; their product is far beyond float16's 65504
        module.lora_A.fill_(200.0)
        module.lora_B.fill_(200.0)
    assert all(torch.isfinite(p).all() for p in module.parameters())
    ids = torch.randint(0, 512, (2, 5), generator=torch.Generator().manual_seed(0))
    output = a(input_ids=ids).logits
    with pytest.raises(MergeError, match=f"'{site}'") as info:
        a.merge(safe=True)
    assert str(info.value).count("self_attn") == 1 and a.merged == []
    torch.testing.assert_close(a(input_ids=ids).logits, output, rtol=0, atol=0, equal_nan=True)  # overflow and all


# ---- memory over a long run -----------------------------------------------------------------

def resident_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096 / 2 ** 20


def live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def churn_run() -> dict:
    """2,000 training steps with adapter churn; the loss curve ends and the memory marks."""
    a = rewriter.apply(mlp(8, 1), '[adapter]\nr = 2\ninit = false\n[[rule]]\nname = "mlp"\nsuffix = ["up", "down"]\n')
    a.add_adapter('[adapter]\nname = "scale"\nmethod = "ia3"\ninit_ia3_weights = false\n'
                  '[[rule]]\nname = "in"\nsuffix = ["up", "head"]\n')
    a.train()
    opt = torch.optim.SGD([p for n, p in a.named_parameters() if ADAPTERS_ATTR in n], lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 8, generator=gen), torch.randn(4, 4, generator=gen)
    losses, marks = [], {}
    for step in range(1, 2001):
        if step % 50 == 0:
            a.set_adapter(["default", "scale"] if step % 100 else ["default"])
        if step % 200 == 0:
            a.merge()
            out(a, x)
            a.unmerge()
        if step % 250 == 0:
            with a.disable_adapters():
                out(a, x)
        loss = torch.nn.functional.mse_loss(a(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step in (500, 2000):  # the same point of every churn cycle
            marks[step] = (resident_mb(), live_tensors())
    return {"first_loss": losses[0], "last_loss": losses[-1], "marks": marks}


def test_2000_training_steps_with_merge_and_adapter_churn_do_not_grow_memory():
    # in a fresh process: resident memory in this one depends on what earlier tests left in the heap
    code = ("import json, sys, torch; torch.set_num_threads(1); sys.path.insert(0, 'tests'); "
            "import test_long_run; print(json.dumps(test_long_run.churn_run()))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    run = json.loads(done.stdout.strip().splitlines()[-1])
    assert run["last_loss"] < run["first_loss"]  # it trained
    (rss_start, tensors_start), (rss_end, tensors_end) = run["marks"]["500"], run["marks"]["2000"]
    assert rss_end - rss_start < 20, f"resident memory grew {rss_end - rss_start:.1f} MB over 1,500 steps"
    assert tensors_end - tensors_start <= 8, f"{tensors_end - tensors_start} more live tensors after 1,500 steps"


def test_adapter_state_churn_does_not_accumulate_objects():
    a = rewriter.apply(mlp(8, 1), '[adapter]\nr = 2\n[[rule]]\nname = "up"\nsuffix = ["up"]\n')
    for _ in range(20):
        a.set_adapter([])
        a.set_adapter("default")
    gc.collect()
    start = len(gc.get_objects())
    for _ in range(60):
        a.set_adapter([])
        a.set_adapter("default")
    gc.collect()
    assert len(gc.get_objects()) - start < 50
