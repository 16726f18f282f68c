"""The rewriter command: verbs, exit codes (0 ok, 1 mismatch, 2 bad input), clear errors, the demo."""
import json
import subprocess
import sys

import pytest

from rewriter import cli
from rewriter.cli import main

RULES = "rules/lora-llama-attention.toml"


@pytest.fixture(autouse=True)
def session_traces(monkeypatch, traced_models):
    """The verbs run on the session's cached traces of the builtin models instead of re-tracing."""
    def traced(spec, dtype=None, attn=None, *, dynamic=True):
        assert spec.startswith("builtin:") and attn is None
        return traced_models(spec.split(":", 1)[1], cli._dtype(dtype))
    monkeypatch.setattr(cli, "_traced", traced)


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_explain_shows_sites_rules_and_counts(capsys):
    code, out, _ = run(capsys, "explain", RULES, "--model", "builtin:tiny-llama")
    assert code == 0
    assert "model.layers.1.self_attn.o_proj  attention  lora" in out and "rule counts: attention=8" in out
    code, out, _ = run(capsys, "explain", RULES, "--model", "builtin:tiny-llama", "--json")
    assert code == 0 and len(json.loads(out)["sites"]) == 8


def test_apply_then_check_and_export_from_the_saved_adapter(capsys, tmp_path):
    code, out, _ = run(capsys, "apply", RULES, "--model", "builtin:tiny-llama", "--out", str(tmp_path / "a"), "--quiet")
    assert code == 0 and (tmp_path / "a" / "rewriter_adapter.json").exists()
    code, out, _ = run(capsys, "check", "--adapter", str(tmp_path / "a"), "--model", "builtin:tiny-llama", "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"] and len(report["sites"]) == 8
    code, out, _ = run(capsys, "export", "--adapter", str(tmp_path / "a"), "--model", "builtin:tiny-llama",
                       "--out", str(tmp_path / "g.py"), "--unmerged")
    assert code == 0 and (tmp_path / "g.py").exists()


def test_check_with_rules_perturbs_and_reports_worst_sites_first(capsys):
    code, out, _ = run(capsys, "check", "--rules", RULES, "--model", "builtin:tiny-gpt2".replace("gpt2", "llama"),
                       "--dtype", "bf16", "--limit", "3")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["site", "max", "|err|", "tolerance", "result"]
    assert "... 5 more site(s)" in out and "OK: 8/8" in out


def test_check_fails_with_exit_1_when_atol_is_impossible(capsys):
    code, out, _ = run(capsys, "check", "--rules", RULES, "--model", "builtin:tiny-llama", "--atol", "0")
    assert code == 1 and "MISMATCH" in out and "FAILED" in out


def test_bad_input_exits_2_with_location(capsys, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[adapter]\nr = 0\n[[rule]]\nname = "x"\nsuffix = "q_proj"\n')
    code, _, err = run(capsys, "explain", str(bad), "--model", "builtin:tiny-llama")
    assert code == 2 and f"{bad}:2, [adapter], field 'r'" in err
    code, _, err = run(capsys, "explain", RULES, "--model", "builtin:tiny-lama")
    assert code == 2 and "did you mean 'tiny-llama'" in err
    code, _, err = run(capsys, "check", "--adapter", str(tmp_path), "--model", "builtin:tiny-llama")
    assert code == 2 and "no adapter here" in err


def test_convert_writes_an_equivalent_rule_file(capsys, tmp_path):
    cfg = {"peft_type": "LORA", "target_modules": ["q_proj", "v_proj"], "r": 4, "lora_alpha": 8,
           "rank_pattern": {"v_proj": 2}, "peft_version": "0.21.2"}
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    code, out, _ = run(capsys, "convert", str(tmp_path), "--out", str(tmp_path / "rules.toml"))
    assert code == 0
    code, out, _ = run(capsys, "explain", str(tmp_path / "rules.toml"), "--model", "builtin:tiny-llama", "--json")
    ranks = {s["site"]: s["params"]["r"] for s in json.loads(out)["sites"]}
    assert ranks == {f"model.layers.{i}.self_attn.{p}_proj": (4 if p == "q" else 2) for i in (0, 1) for p in "qv"}


def test_console_script_runs_and_reports_version():
    done = subprocess.run([sys.executable, "-m", "rewriter.cli", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("rewriter ")


def test_demo_trains_merges_checks_and_exports(tmp_path):
    from rewriter.demo import run_demo
    summary = run_demo(out=tmp_path, steps=40, quiet=True)
    assert summary["loss_last"] < summary["loss_first"]
    assert summary["accuracy_after"] > summary["accuracy_before"] + 0.25
    assert summary["merge_ok"] and summary["exported_error"] < 1e-4
    assert (tmp_path / "model-merged.pt2").exists() and (tmp_path / "adapter-peft" / "adapter_config.json").exists()


def test_explain_lists_the_targets_of_graph_level_methods(capsys):
    code, out, _ = run(capsys, "explain", "rules/adaption-prompt-llama.toml", "--model", "builtin:tiny-llama")
    assert code == 0
    assert "model.layers.1.self_attn" in out and "adaption_prompt" in out and "q_proj" not in out


def test_remap_renames_the_modules_of_a_loaded_adapter(capsys, tmp_path):
    code, _, _ = run(capsys, "apply", RULES, "--model", "builtin:tiny-llama", "--out", str(tmp_path / "a"), "-q")
    manifest = tmp_path / "a" / "rewriter_adapter.json"
    manifest.write_text(manifest.read_text().replace("model.layers.", "decoder.blocks."))  # "trained elsewhere"
    code, _, err = run(capsys, "check", "--adapter", str(tmp_path / "a"), "--model", "builtin:tiny-llama")
    assert code == 2 and "decoder.blocks.0" in err
    (tmp_path / "remap.toml").write_text('[remap]\n"decoder.blocks" = "model.layers"\n')
    code, out, _ = run(capsys, "check", "--adapter", str(tmp_path / "a"), "--model", "builtin:tiny-llama",
                       "--remap", str(tmp_path / "remap.toml"), "--json")
    assert code == 0 and len(json.loads(out)["sites"]) == 8


def test_plot_scalings_writes_a_png(capsys, tmp_path):
    import torch
    from safetensors.torch import save_file
    save_file({"scalings": torch.rand(1, 5, 4, 3)}, str(tmp_path / "s.safetensors"))
    code, _, _ = run(capsys, "plot-scalings", str(tmp_path / "s.safetensors"), "--out", str(tmp_path / "h.png"))
    assert code == 0 and (tmp_path / "h.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    code, _, _ = run(capsys, "plot-scalings", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "x.png"))
    assert code == 2 and not (tmp_path / "x.png").exists()
