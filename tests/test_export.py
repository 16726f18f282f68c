"""Exports: .pt2 (loads with plain torch, no rewriter), ONNX (checked with onnxruntime), readable code."""
import json
import subprocess
import sys
import zipfile

import pytest
import torch

import rewriter
from rewriter.exporter import adapter_nodes

RULES = '[adapter]\nr = 4\ninit = false\n[[rule]]\nname = "attention-qv"\nsuffix = ["q_proj", "v_proj"]\n'

# runs in a fresh interpreter where importing rewriter fails
LOADER = r"""
import sys, json, torch
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "rewriter" or name.startswith("rewriter."):
            raise ImportError("rewriter is blocked in this process")
sys.meta_path.insert(0, Block())
try:
    import rewriter
    raise SystemExit("rewriter was importable")
except ImportError:
    pass
import transformers.modeling_outputs  # registers the ModelOutput pytree types of the outputs
ep = torch.export.load(sys.argv[1])
ids = torch.load(sys.argv[2])
with torch.no_grad():
    out = ep.module()(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
torch.save(out, sys.argv[3])
"""


@pytest.fixture(scope="module")
def adapted_llama():
    from rewriter.models import load_model
    return rewriter.apply(load_model("builtin:tiny-llama"), RULES)


def test_pt2_merged_and_unmerged_run_without_rewriter(adapted_llama, tmp_path):
    ids = torch.randint(0, 512, (3, 13))  # another shape than traced: dynamic dims survive
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        expected = adapted_llama(input_ids=ids).logits
        with adapted_llama.disable_adapters():
            base = adapted_llama(input_ids=ids).logits
    for merged in (True, False):
        path = rewriter.export(adapted_llama, tmp_path / f"m{merged}.pt2", merged=merged)
        program = torch.export.load(str(path))
        left = adapter_nodes(program.graph)
        if merged:
            assert left == [], "a merged export must not contain adapter ops"
            assert not any("rewriter" in name for name in program.state_dict)
        else:
            assert len([n for n in program.graph.nodes if n.op == "call_function"
                        and "linear" in str(n.target) and "lora" in str(n.args[1])]) == 8
        subprocess.run([sys.executable, "-c", LOADER, str(path), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
                       check=True, cwd=tmp_path)
        got = torch.load(tmp_path / "out.pt")
        assert (got - expected).abs().max() <= 1e-4
        assert (got - base).abs().max() > 1e-2, "the export must carry the adapter, not the base weights"
        with zipfile.ZipFile(path) as archive:
            info = json.loads(archive.read(next(n for n in archive.namelist() if n.endswith("rewriter.json"))))
        assert info["merged"] is merged and info["adapters"]["default"]["methods"] == ["lora"]
    assert adapted_llama.merged == []  # the export restored the state


def test_onnx_matches_onnxruntime_at_two_shapes(adapted_llama, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    path = rewriter.export(adapted_llama, tmp_path / "m.onnx", merged=True)
    session = ort.InferenceSession(str(path))
    for shape in ((2, 8), (3, 17)):
        ids = torch.randint(0, 512, shape)
        with torch.no_grad():
            expected = adapted_llama(input_ids=ids).logits.numpy()
        got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": torch.ones_like(ids).numpy()})[0]
        assert abs(got - expected).max() <= 1e-4
    import onnx
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(meta["rewriter"])["merged"] is True


def test_code_export_marks_inserted_nodes_by_rule(adapted_llama, tmp_path):
    path = rewriter.export(adapted_llama, tmp_path / "graph.py", merged=False)
    text = path.read_text()
    marked = [line for line in text.splitlines() if "# rewriter: rule 'attention-qv', lora, adapter 'default'" in line]
    assert len(marked) == 4
    assert text.startswith("# rewriter {")
    merged_code = rewriter.export(adapted_llama, tmp_path / "merged.py", merged=True).read_text()
    assert "rewriter_adapters" not in merged_code.split("\n", 1)[1]
