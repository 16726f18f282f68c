"""Exports ready for deployment: adapters as data (one unmerged .pt2, many adapter weight files,
swapped with plain torch), unmerged ONNX against onnxruntime, and clear ONNX failures."""
import importlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import rewriter
from rewriter import cli
from rewriter.adapted import Adapted
from rewriter.check import perturb
from rewriter.exporter import SLOT_CONTRACT, read_provenance
from rewriter.models import TinyMLP
from rewriter.core.tolerance import output_tolerance
from rewriter.core.tracing import trace_model

LORA = '[adapter]\nname = "{name}"\nr = {r}\n[[rule]]\nname = "attention-qv"\nsuffix = ["q_proj", "v_proj"]\n'


def _logits(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    return out.logits


@pytest.fixture(scope="module")
def served(traced_models, tmp_path_factory):
    """tiny-llama with adapters 'default' and 'style' (same shapes, different weights) and one
    unmerged program exported with 'default' in its slot."""
    adapted = Adapted(traced_models("tiny-llama"))
    for name in ("default", "style"):
        adapted.add_adapter(LORA.format(name=name, r=4), name)
    perturb(adapted, seed=1, adapter_names=["default"])
    perturb(adapted, seed=2, adapter_names=["style"])
    adapted.set_adapter("default")
    program = rewriter.export(adapted, tmp_path_factory.mktemp("served") / "base.pt2", merged=False)
    return adapted, program


def test_one_program_serves_several_adapters_swapped_with_plain_torch(served, tmp_path):
    adapted, program = served
    slots = read_provenance(program)["adapter_slots"]
    assert slots["contract"] == SLOT_CONTRACT == 1 and [s["slot"] for s in slots["slots"]] == ["default"]
    assert "rewriter_adapters.default.model__layers__0__self_attn__q_proj.lora_A" in slots["slots"][0]["tensors"]
    weights = {}
    for name in ("default", "style"):
        adapted.set_adapter(name)
        weights[name] = rewriter.export(adapted, tmp_path / f"{name}.safetensors", program=program)
    adapted.set_adapter("default")

    ids = torch.randint(0, 512, (3, 11))  # another shape than traced
    expected = {}
    for name in ("default", "style"):
        adapted.set_adapter(name)
        expected[name] = _logits(adapted, ids)
    adapted.set_adapter("default")
    with adapted.disable_adapters():
        base = _logits(adapted, ids)
    tol = output_tolerance(base, torch.float32, depth=2)
    assert (expected["style"] - expected["default"]).abs().max() > tol and (expected["style"] - base).abs().max() > tol

    model = torch.export.load(str(program)).module()       # plain torch from here on
    assert (_logits(model, ids) - expected["default"]).abs().max() <= tol
    for name in ("style", "default", "style"):
        missing, unexpected = model.load_state_dict(load_file(str(weights[name])), strict=False)
        assert unexpected == [] and not any("rewriter_adapters" in k for k in missing)
        assert (_logits(model, ids) - expected[name]).abs().max() <= tol, f"after swapping in '{name}'"

    with safe_open(str(weights["style"]), framework="pt") as fh:
        meta = json.loads(fh.metadata()["rewriter"])
    assert meta["filled_with"] == ["style"] and meta["contract"] == 1 and meta["rewriter_version"]
    assert meta["adapters"]["style"]["methods"] == ["lora"]


def test_adapters_that_do_not_fit_the_slots_are_refused(served, tmp_path):
    adapted, program = served
    adapted.add_adapter(LORA.format(name="wide", r=8), "wide")
    adapted.add_adapter(LORA.format(name="loud", r=4) + "lora_alpha = 64\n", "loud")   # same shapes, other scaling
    adapted.add_adapter(LORA.format(name="wet", r=4) + "lora_dropout = 0.3\n", "wet")  # dropout: training only
    perturb(adapted, seed=3, adapter_names=["loud", "wet"])
    try:
        adapted.set_adapter("wide")
        with pytest.raises(rewriter.RewriterError, match="adapter 'wide' does not fit slot 'default': shape mismatch"):
            rewriter.export(adapted, tmp_path / "wide.safetensors", program=program)
        adapted.set_adapter("loud")
        with pytest.raises(rewriter.RewriterError, match="computes differently .* parameters differ: lora_alpha"):
            rewriter.export(adapted, tmp_path / "loud.safetensors", program=program)
        adapted.set_adapter("wet")
        assert rewriter.export(adapted, tmp_path / "wet.safetensors", program=program).exists()
        (tmp_path / "wet.safetensors").unlink()
        adapted.set_adapter(["default", "style"])
        with pytest.raises(rewriter.RewriterError, match=r"1 adapter slot\(s\) \['default'\], 2 adapter\(s\)"):
            rewriter.export(adapted, tmp_path / "two.safetensors", program=program)
        with pytest.raises(rewriter.RewriterError, match="none was given"):
            rewriter.export(adapted, tmp_path / "none.safetensors")
    finally:
        adapted.set_adapter("default")
        for name in ("wide", "loud", "wet"):
            adapted.delete_adapter(name)
    assert list(tmp_path.iterdir()) == []   # nothing half-written


def test_constants_of_the_program_must_match_too(tmp_path):
    """FourierFT's spectral locations are constants of the program: another seed does not fit,
    though every tensor has the same name and shape."""
    adapted = Adapted(trace_model(TinyMLP(), (torch.randn(2, 32),)))
    rules = '[adapter]\nname = "{}"\nmethod = "fourierft"\nn_frequency = 16\nrandom_loc_seed = {}\n' \
            '[[rule]]\nname = "up"\nsuffix = "up"\n'
    adapted.add_adapter(rules.format("a", 1), "a")
    adapted.add_adapter(rules.format("b", 2), "b")
    program = rewriter.export(adapted, tmp_path / "a.pt2", merged=False)
    adapted.set_adapter("b")
    with pytest.raises(rewriter.RewriterError, match="computes differently .* parameters differ: random_loc_seed"):
        rewriter.export(adapted, tmp_path / "b.safetensors", program=program)
    merged = rewriter.export(adapted, tmp_path / "merged.pt2")
    with pytest.raises(rewriter.RewriterError, match="exported merged"):
        rewriter.export(adapted, tmp_path / "b.safetensors", program=merged)


def test_cli_writes_weights_for_a_program(served, tmp_path, monkeypatch, traced_models, capsys):
    _, program = served
    monkeypatch.setattr(cli, "_traced", lambda spec, dtype=None, attn=None: traced_models("tiny-llama"))
    rules = tmp_path / "other.toml"
    rules.write_text(LORA.format(name="other", r=4).replace("r = 4", "r = 4\ninit = false"))
    out = tmp_path / "other.safetensors"
    code = cli.main(["export", "--rules", str(rules), "--model", "builtin:tiny-llama", "--out", str(out),
                     "--program", str(program)])
    assert code == 0 and f"wrote {out} (weights for {program})" in capsys.readouterr().out
    slot = read_provenance(program)["adapter_slots"]["slots"][0]["tensors"]
    assert {k: list(v.shape) for k, v in load_file(str(out)).items()} == {k: v["shape"] for k, v in slot.items()}
    code = cli.main(["export", "--rules", str(rules), "--model", "builtin:tiny-llama", "--out", str(out)])
    assert code == 2 and "--program base.pt2" in capsys.readouterr().err


def test_unmerged_onnx_keeps_the_adapter_and_matches_onnxruntime_at_two_shapes(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    import onnx
    adapted = rewriter.apply(TinyMLP(), '[adapter]\nr = 4\ninit = false\n[[rule]]\nname = "up"\nsuffix = "up"\n',
                             example_inputs=(torch.randn(2, 32),))
    path = rewriter.export(adapted, tmp_path / "unmerged.onnx", merged=False)
    model = onnx.load(str(path))
    assert sum("lora" in init.name for init in model.graph.initializer) == 4   # lora_A, lora_B on 2 sites
    assert json.loads({p.key: p.value for p in model.metadata_props}["rewriter"])["merged"] is False
    session = ort.InferenceSession(str(path))
    for batch in (2, 7):
        x = torch.randn(batch, 32)
        with torch.no_grad():
            expected = adapted(x)
            with adapted.disable_adapters():
                base = adapted(x)
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        tol = output_tolerance(expected, torch.float32, depth=2)
        assert (got - expected).abs().max() <= tol and (got - base).abs().max() > tol


@torch.library.custom_op("rwtest::wobble", mutates_args=())
def _wobble(x: torch.Tensor) -> torch.Tensor:
    return x * 1.5


@_wobble.register_fake
def _(x):
    return torch.empty_like(x)


class _Wobbly(nn.Module):
    """A model with an op that has no ONNX translation."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(8, 8)

    def forward(self, x):
        return _wobble(self.up(x))


def test_onnx_failure_names_the_op_and_the_fix(tmp_path):
    pytest.importorskip("onnxruntime")
    adapted = rewriter.apply(_Wobbly(), '[[rule]]\nname = "up"\nsuffix = "up"\n', example_inputs=(torch.randn(2, 8),))
    with pytest.raises(rewriter.RewriterError) as info:
        rewriter.export(adapted, tmp_path / "m.onnx")
    assert "the op 'rwtest.wobble' has no ONNX translation" in info.value.what
    assert "format='pt2'" in info.value.fix and "custom_translation_table" in info.value.fix
    assert list(tmp_path.iterdir()) == []


def test_export_can_retrace_with_eager_attention(monkeypatch):
    """The fix the ONNX error gives for T5-style sdpa failures, from the CLI."""
    monkeypatch.setattr(importlib.import_module("rewriter.core.tracing"), "trace_model", lambda model, **_: model)  # no tracing
    assert cli._traced("builtin:tiny-t5", None, "eager").config._attn_implementation == "eager"
    with pytest.raises(rewriter.RewriterError, match="applies to Hugging Face models, not TinyMLP"):
        cli._traced("builtin:tiny-mlp", None, "eager")
