"""Adapter checkpoints in rewriter's format: exact round trips, atomic writes, loud failures."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

import rewriter
from rewriter import CheckpointError
from rewriter.checkpoint import MANIFEST

RULES = '[adapter]\nr = 4\ninit = false\n[[rule]]\nname = "qv"\nsuffix = ["q_proj", "v_proj"]\n'
IDS = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(2))


def out(a):
    with torch.no_grad():
        return a(input_ids=IDS).logits


@pytest.fixture
def saved(traced_models, tmp_path):
    a = rewriter.apply(traced_models("tiny-llama"), RULES)
    a.save_adapter(tmp_path / "ckpt")
    return a, tmp_path / "ckpt"


def test_round_trip_is_exact_and_keeps_rules_and_plan(saved, traced_models):
    a, path = saved
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["rules"] == RULES and len(manifest["plan"]["sites"]) == 4
    assert (path / "rules.toml").read_text() == RULES
    b = rewriter.load_adapter(rewriter.Adapted(traced_models("tiny-llama")), path)
    assert torch.equal(out(a), out(b))
    c = rewriter.Adapted(traced_models("tiny-llama"))
    c.load_adapter(path, adapter_name="other")
    assert list(c.adapters) == ["other"] and torch.equal(out(c), out(a))


def test_low_cpu_mem_usage_materialises_on_load(saved, traced_models):
    a, path = saved
    b = rewriter.Adapted(traced_models("tiny-llama"))
    from rewriter.checkpoint import load_adapter_into
    load_adapter_into(b, path, low_cpu_mem_usage=True)
    assert all(p.device.type == "cpu" for p in b.parameters())
    assert torch.equal(out(a), out(b))


def test_saving_again_replaces_atomically_and_leaves_no_temp_files(saved):
    a, path = saved
    with torch.no_grad():
        next(iter(a.adapters["default"].modules.values())).lora_B.add_(1.0)
    a.save_adapter(path)
    files = sorted(os.listdir(path))
    assert len([f for f in files if f.endswith(".safetensors")]) == 1
    assert not [f for f in files if f.startswith(".")], files


def test_several_adapters_go_in_subdirectories(saved, tmp_path, traced_models):
    a, _ = saved
    a.add_adapter(RULES.replace("[adapter]", '[adapter]\nname = "second"'))
    a.save_adapter(tmp_path / "both")
    assert sorted(os.listdir(tmp_path / "both")) == ["default", "second"]
    b = rewriter.load_adapter(rewriter.Adapted(traced_models("tiny-llama")), tmp_path / "both")
    assert sorted(b.adapters) == ["default", "second"]


def _fails_and_leaves_model_unchanged(traced_models, path, match):
    b = rewriter.Adapted(traced_models("tiny-llama"))
    before = out(b)
    with pytest.raises(CheckpointError, match=match):
        b.load_adapter(path)
    assert not b.adapters and torch.equal(out(b), before)


def test_truncated_weights_are_refused(saved, traced_models):
    _, path = saved
    weights = next(path.glob("adapter-*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    _fails_and_leaves_model_unchanged(traced_models, path, "not a valid safetensors")


def test_missing_unexpected_and_misshapen_keys_are_named(saved, traced_models):
    _, path = saved
    weights = next(path.glob("adapter-*.safetensors"))
    from safetensors.torch import load_file
    tensors = load_file(weights)
    key = "sites/model.layers.0.self_attn.q_proj/lora_A"
    tensors[key] = torch.zeros(3, 64)
    del tensors["sites/model.layers.1.self_attn.v_proj/lora_B"]
    tensors["sites/model.layers.9.mlp.up_proj/lora_A"] = torch.zeros(4, 64)
    save_file(tensors, weights)
    b = rewriter.Adapted(traced_models("tiny-llama"))
    with pytest.raises(CheckpointError) as info:
        b.load_adapter(path)
    text = str(info.value)
    assert "missing 1 key(s): sites/model.layers.1.self_attn.v_proj/lora_B" in text
    assert "unexpected 1 key(s): sites/model.layers.9.mlp.up_proj/lora_A" in text
    assert "model.layers.0.self_attn.q_proj/lora_A: checkpoint (3, 64) vs model (4, 64)" in text
    assert not b.adapters


def test_non_finite_weights_are_refused(saved, traced_models):
    _, path = saved
    weights = next(path.glob("adapter-*.safetensors"))
    from safetensors.torch import load_file
    tensors = load_file(weights)
    tensors["sites/model.layers.0.self_attn.q_proj/lora_B"][0, 0] = float("nan")
    save_file(tensors, weights)
    _fails_and_leaves_model_unchanged(traced_models, path, "NaN or Inf")


def test_pickle_files_are_never_loaded(tmp_path, traced_models):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "target_modules": ["q_proj"]}))
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    _fails_and_leaves_model_unchanged(traced_models, tmp_path, "never unpickles")


def test_adapter_for_other_modules_is_refused_by_name(saved, traced_models):
    _, path = saved
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["plan"]["sites"][0]["site"] = "model.layers.0.attn.q_proj"
    (path / MANIFEST).write_text(json.dumps(manifest))
    _fails_and_leaves_model_unchanged(traced_models, path, "no module")
