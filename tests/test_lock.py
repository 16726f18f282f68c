"""The CI gate: ``rewriter lock`` / ``check --lock`` (plan drift, site by site), ``rewriter check``
for every mergeable method, stacked adapters and the deploy dtype, ``--quiet`` and progress bars."""
import io
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from rewriter import cli, progress
from rewriter.adapted import Adapted
from rewriter.lock import check_lock, make_lock, read_lock, stack_rules, write_lock
from rewriter.methods import METHODS
from rewriter.rules import load_rules
from rewriter.core.tracing import trace_model

ROOT = Path(__file__).resolve().parents[1]
ATTENTION = (ROOT / "rules" / "lora-llama-attention.toml").read_text()


@pytest.fixture
def run(capsys, monkeypatch, traced_models):
    """``rewriter ARGS`` in-process, on the session's cached traces of the builtin models."""
    def traced(spec, dtype=None, attn=None):
        return traced_models(spec.split(":", 1)[1], cli._dtype(dtype))
    monkeypatch.setattr(cli, "_traced", traced)

    def call(*argv):
        code = cli.main([str(a) for a in argv])
        out = capsys.readouterr()
        return code, out.out, out.err
    return call


def test_lock_then_check_passes_and_drift_fails_site_by_site(run, tmp_path, monkeypatch):
    rules = tmp_path / "rules" / "attention.toml"
    rules.parent.mkdir()
    rules.write_text(ATTENTION)
    lock_path = tmp_path / "rules.lock.json"
    code, out, _ = run("lock", rules, "--model", "builtin:tiny-llama", "--out", lock_path)
    assert code == 0 and "1 adapter(s) ['default'], 8 site(s)" in out
    lock = json.loads(lock_path.read_text())
    assert lock["adapters"][0]["rules_file"] == "rules/attention.toml"   # relative to the lock: works from anywhere
    assert lock["adapters"][0]["sites"]["model.layers.1.self_attn.k_proj"] == {"rule": "attention", "shape": [32, 64]}
    assert lock["adapters"][0]["rules"]["attention"]["params"]["r"] == 8 and len(lock["graph"]["fingerprint"]) == 64

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, out, _ = run("check", "--lock", lock_path)          # the lock alone names rules and model
    assert code == 0 and out.startswith(f"plan matches {lock_path}") and "OK: 8/8 sites" in out

    rules.write_text("# a comment changes the file, not the plan\n" + ATTENTION)
    code, out, _ = run("check", "--lock", lock_path)
    assert code == 0 and "note: rules/attention.toml changed since the lock, but its plan did not" in out
    code, out, _ = run("check", "--lock", lock_path, "--quiet")
    assert code == 0 and out.splitlines() == ["OK: 8/8 sites equal within tolerance (float32)"]

    rules.write_text(ATTENTION.replace("r = 8", "r = 16").replace("(q|k|v|o)", "(q|v|o)"))
    code, out, _ = run("check", "--lock", lock_path)
    assert code == 1
    lines = out.splitlines()
    assert "    - model.layers.0.self_attn.k_proj  no longer adapted (was rule 'attention', lora)" in lines
    assert "    ~ model.layers.1.self_attn.q_proj  r: 8 -> 16" in lines
    assert sum(line.startswith("    ~ ") for line in lines) == 6 and "merge check skipped: the plan drifted" in out
    update = lines[lines.index(next(line for line in lines if line.startswith("FAILED"))) + 1].split()
    assert update[:2] == ["rewriter", "lock"]
    code, out, _ = run("check", "--lock", lock_path, "--json")
    report = json.loads(out)
    assert code == 1 and not report["ok"] and report["merge"] is None and len(report["lock"]["changes"]) == 8

    code, _, _ = run(*update[1:])                               # the printed command refreshes the lock
    code, out, _ = run("check", "--lock", lock_path)
    assert code == 0 and "plan matches" in out


class _MLP(nn.Module):
    """Blocks in a container whose name a "model update" can change."""

    def __init__(self, container: str, depth: int):
        super().__init__()
        self.container = container
        setattr(self, container, nn.ModuleList(nn.ModuleDict({"up": nn.Linear(8, 16), "down": nn.Linear(16, 8)})
                                               for _ in range(depth)))

    def forward(self, x):
        for block in getattr(self, self.container):
            x = x + block["down"](torch.relu(block["up"](x)))
        return x


def _mlp(container: str, depth: int = 2) -> Adapted:
    return Adapted(trace_model(_MLP(container, depth), (torch.randn(2, 8),)))


def test_model_updates_show_as_added_removed_and_renamed_sites(tmp_path):
    rules = tmp_path / "mlp.toml"
    rules.write_text('[adapter]\nr = 2\n[[rule]]\nname = "ffn"\nsuffix = ["up", "down"]\n')
    ruleset = load_rules(rules)
    base = _mlp("layers")
    names = stack_rules(base, [ruleset])
    lock_path = tmp_path / "rules.lock.json"
    write_lock(lock_path, make_lock(base, [ruleset], names, model="my.models:mlp", dtype=None, lock_path=lock_path))
    lock = read_lock(lock_path)
    same = check_lock(lock, _mlp("layers"))
    assert lock.model == "my.models:mlp" and same.ok and same.notes == []  # a fresh trace: same fingerprint

    deeper = check_lock(lock, _mlp("layers", depth=3))
    assert [(c.kind, c.name) for c in deeper.changes] == [("+", "layers.2.up"), ("+", "layers.2.down")]
    assert any("traced graph changed" in n for n in deeper.notes)

    renamed = check_lock(lock, _mlp("blocks"))
    expected = {(kind, f"{container}.{i}.{p}") for kind, container in (("-", "layers"), ("+", "blocks"))
                for i in (0, 1) for p in ("up", "down")}
    assert {(c.kind, c.name) for c in renamed.changes} == expected
    removed = next(c for c in renamed.changes if c.name == "layers.0.up")
    assert removed.detail.endswith("renamed to 'blocks.0.up'?")
    assert "FAILED: 8 change(s)" in renamed.format()


def test_lock_errors_are_bad_input(run, tmp_path):
    code, _, err = run("check", "--lock", tmp_path / "missing.json")
    assert code == 2 and "cannot read the lock file" in err and "rewriter lock" in err
    (tmp_path / "bad.json").write_text('{"lock_version": 1, "model": ')
    code, _, err = run("check", "--lock", tmp_path / "bad.json")
    assert code == 2 and "not valid JSON" in err
    (tmp_path / "old.json").write_text('{"lock_version": 99}')
    code, _, err = run("check", "--lock", tmp_path / "old.json")
    assert code == 2 and "unsupported lock_version 99" in err
    code, _, err = run("check", "--lock", tmp_path / "old.json", "--rules", "x.toml")
    assert code == 2 and "--lock takes the rule files from the lock" in err
    code, _, err = run("check", "--rules", "x.toml")
    assert code == 2 and "needs --model" in err


MERGEABLE = sorted(name for name, spec in METHODS.items() if spec.module_cls.not_mergeable is None)


@pytest.mark.parametrize("method", MERGEABLE)
def test_every_mergeable_method_passes_check_with_its_shipped_llama_rules(run, method):
    shipped = sorted((ROOT / "rules").glob(f"{method}-llama*.toml"))
    assert shipped, f"rules/{method}-llama*.toml is missing: every mergeable method ships a rule file"
    code, out, _ = run("check", "--rules", shipped[0], "--model", "builtin:tiny-llama", "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"] and report["sites"]
    assert report["output_error"] <= report["output_tolerance"]


def test_stacked_adapters_checked_in_the_deploy_dtype(run):
    stack = ["--rules", ROOT / "rules/lora-llama-attention.toml", "--rules", ROOT / "rules/lokr-llama.toml",
             "--rules", ROOT / "rules/oft-llama.toml"]
    code, out, _ = run("check", *stack, "--model", "builtin:tiny-llama", "--dtype", "bf16", "--json")
    report = json.loads(out)
    assert code == 0 and report["dtype"] == "bfloat16"
    q_proj = next(s for s in report["sites"] if s["site"] == "model.layers.0.self_attn.q_proj")
    assert q_proj["adapters"] == ["default", "lokr_llama", "oft_llama"]
    ratios = [s["max_error"] / s["tolerance"] for s in report["sites"]]
    assert ratios == sorted(ratios, reverse=True) and max(ratios) > 0
    code, out, _ = run("check", *stack, "--model", "builtin:tiny-llama", "--dtype", "bf16", "--atol", "0", "--quiet")
    assert code == 1 and "MISMATCH" in out and " ok" not in out and out.splitlines()[-1].startswith("FAILED")
    assert "MISMATCH  default < lokr_llama < oft_llama" in out      # which adapters stack at each site


def test_every_verb_takes_quiet_and_quiet_check_prints_one_line(run):
    parser = cli.build_parser()
    verbs = parser._subparsers._group_actions[0].choices
    for verb, sub in verbs.items():
        assert any("--quiet" in a.option_strings for a in sub._actions), f"'{verb}' has no --quiet"
    code, out, err = run("check", "--rules", ROOT / "rules/lora-llama-attention.toml", "--model",
                         "builtin:tiny-llama", "--quiet")
    assert code == 0 and out.splitlines() == ["OK: 8/8 sites equal within tolerance (float32)"] and err == ""


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bars_show_on_a_terminal_unless_quiet(monkeypatch):
    for quiet, shown in ((False, True), (True, False)):
        terminal = _Terminal()
        monkeypatch.setattr("sys.stderr", terminal)
        progress.set_quiet(quiet)
        try:
            with progress.steps("model builtin:tiny-llama", ["load", "trace"]) as step:
                step("load")
                step("trace")                                    # a slow step shows at once, with its name
            list(progress.bar(range(3), desc="checking merged sites"))  # a quick loop shows nothing
        finally:
            progress.set_quiet(False)
        text = terminal.getvalue()
        assert ("model builtin:tiny-llama" in text and "trace" in text) is shown
        assert "checking merged sites" not in text
    monkeypatch.setattr(progress, "DELAY", 0)                    # as if the loop had lasted a while
    monkeypatch.setattr("sys.stderr", terminal := _Terminal())
    list(progress.bar(range(3), desc="checking merged sites"))
    assert "checking merged sites" in terminal.getvalue()


def test_the_documented_ci_workflow_uses_valid_commands():
    """Every ``rewriter ...`` command in docs/ci-example.yml parses with today's CLI."""
    import shlex

    import yaml
    workflow = yaml.safe_load((ROOT / "docs" / "ci-example.yml").read_text())
    runs = [step["run"] for job in workflow["jobs"].values() for step in job["steps"] if "run" in step]
    commands = [line.strip()[line.strip().index("rewriter "):] for run in runs
                for line in run.replace("\\\n", " ").splitlines() if "rewriter " in line and "pip" not in line]
    assert any(c.startswith("rewriter check --lock") for c in commands) and len(commands) == 2
    parser = cli.build_parser()
    for command in commands:
        argv = shlex.split(command.split(">")[0].split("||")[0])[1:]
        args = parser.parse_args([a.replace("$", "") for a in argv])
        assert args.func is cli.cmd_check
