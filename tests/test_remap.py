"""An explicit rename table ([remap]) lets a checkpoint load on a model whose modules were renamed."""
import pytest
import torch
from torch import nn

import rewriter
from rewriter.check import perturb
from rewriter.errors import CheckpointError, RuleError
from rewriter.adapted import Adapted
from rewriter.rules import Remap, parse_rules, read_remap
from rewriter.core.tracing import trace_model

RULES = """
[adapter]
method = "lora"
r = 2

[[rule]]
suffix = ["fc1", "fc2"]
"""


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class Old(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.example_inputs = (torch.randn(3, 8),)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class New(nn.Module):
    """The same network after a refactor: blocks -> layers, fc1/fc2 -> mlp.up/mlp.down."""
    def __init__(self, old: Old):
        super().__init__()
        self.layers = nn.ModuleList()
        for block in old.blocks:
            layer = nn.Module()
            layer.mlp = nn.Module()
            layer.mlp.up, layer.mlp.down = block.fc1, block.fc2
            self.layers.append(layer)
        self.example_inputs = old.example_inputs

    def forward(self, x):
        for layer in self.layers:
            x = x + layer.mlp.down(torch.relu(layer.mlp.up(x)))
        return x


TABLE = {"blocks": "layers", **{f"blocks.{i}.fc1": f"layers.{i}.mlp.up" for i in range(2)},
         **{f"blocks.{i}.fc2": f"layers.{i}.mlp.down" for i in range(2)}}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    old = Old()
    adapted = rewriter.apply(old, RULES)
    perturb(adapted, scale=0.3)
    x = torch.randn(5, 8)
    with torch.no_grad():
        expected = adapted(x)
    root = tmp_path_factory.mktemp("remap")
    adapted.save_adapter(root / "ours")
    adapted.save_adapter(root / "peft", format="peft")
    return old, x, expected, root


@pytest.mark.parametrize("fmt", ["ours", "peft"])
def test_remapped_checkpoint_reproduces_the_outputs(saved, fmt):
    old, x, expected, root = saved
    new = Adapted(trace_model(New(old)))
    new.load_adapter(root / fmt, remap=TABLE)
    assert sorted(new.adapters["default"].modules) == sorted(TABLE[k] for k in TABLE if "." in k)
    with torch.no_grad():
        assert torch.equal(new(x), expected)


def test_without_the_table_loading_fails_by_name_and_leaves_nothing(saved):
    old, _, _, root = saved
    new = Adapted(trace_model(New(old)))
    with pytest.raises(CheckpointError, match="blocks.0.fc1"):
        new.load_adapter(root / "ours")
    assert not new.adapters


def test_the_table_can_live_in_a_rule_file(saved, tmp_path):
    old, x, expected, root = saved
    lines = "\n".join(f'"{k}" = "{v}"' for k, v in TABLE.items())
    path = tmp_path / "new.toml"
    path.write_text(RULES.replace("fc1", "up").replace("fc2", "down") + "\n[remap]\n" + lines + "\n")
    assert parse_rules(path.read_text()).remap == read_remap(TABLE)
    new = Adapted(trace_model(New(old)))
    new.load_adapter(root / "peft", remap=path)
    with torch.no_grad():
        assert torch.equal(new(x), expected)


def test_longest_prefix_on_whole_components():
    table = Remap((("a", "x"), ("a.b", "y")))
    assert table.apply("a.b.c") == "y.c"
    assert table.apply("a.bc") == "x.bc"
    assert table.apply("ab.c") == "ab.c"


@pytest.mark.parametrize("bad", [{"blocks.": "layers"}, {"blocks": ""}, {"blocks": 3}])
def test_bad_tables_say_where(bad, tmp_path):
    with pytest.raises(RuleError, match="remap"):
        read_remap(bad)
    path = tmp_path / "bad.toml"
    path.write_text("[remap]\nblocks = [1]\n")
    with pytest.raises(RuleError, match=r"bad.toml.*\[remap\]"):
        read_remap(path)
    path.write_text("[adapter]\n")
    with pytest.raises(RuleError, match="no \\[remap\\]"):
        read_remap(path)


def test_two_saved_modules_onto_one_is_refused(saved):
    old, _, _, root = saved
    new = Adapted(trace_model(New(old)))
    with pytest.raises(CheckpointError, match="several saved modules"):
        new.load_adapter(root / "ours", remap={"blocks.0.fc1": "layers.0.mlp.up", "blocks.0.fc2": "layers.0.mlp.up"})
