"""Hostile and broken checkpoints: a clear error naming the file, never an unpickle, never a half-loaded
model.  Extends test_checkpoint.py with header attacks, non-float and overflowing dtypes, PEFT-format
variants, manifest tampering, and directories of several adapters where only a later one is bad.

Every failed load is checked against a snapshot of the whole model (state, adapters, graph, output),
taken on a model that already holds an adapter, so a load that half-installs is caught.
"""
import json
import pickle
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import rewriter
from rewriter import CheckpointError, RewriterError
from rewriter.checkpoint import MANIFEST, PEFT_CONFIG, PEFT_WEIGHTS
from tiny_graphs import mlp

RULES = '[adapter]\nr = 4\ninit = false\n[[rule]]\nname = "mlp"\nsuffix = ["up", "down"]\n'
KEEP = '[adapter]\nname = "keep"\nr = 2\ninit = false\n[[rule]]\nname = "head"\nsuffix = ["head"]\n'
X = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))


def model_with_an_adapter() -> rewriter.Adapted:
    return rewriter.apply(mlp(32), KEEP)


def snapshot(a: rewriter.Adapted) -> dict:
    with torch.no_grad():
        out = a(X)
    return {"state": {k: v.clone() for k, v in a.state_dict().items()}, "adapters": list(a.adapters),
            "active": a.active_adapters, "code": a.gm.code, "out": out}


def assert_same(before: dict, after: dict) -> None:
    assert after["adapters"] == before["adapters"] and after["active"] == before["active"]
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())
    assert after["code"] == before["code"] and torch.equal(after["out"], before["out"])


def refused(path, match: str, names: str | None = None):
    """Loading ``path`` raises a CheckpointError matching ``match`` that names ``names`` (a file), and
    the model is exactly as before."""
    a = model_with_an_adapter()
    before = snapshot(a)
    with pytest.raises(CheckpointError, match=match) as info:
        a.load_adapter(path)
    assert_same(before, snapshot(a))
    if names is not None:
        assert str(names) in str(info.value)
    return info.value


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """One saved adapter in each format, and a directory with two adapters in each format."""
    root = tmp_path_factory.mktemp("good")
    a = rewriter.apply(mlp(32), RULES)
    a.save_adapter(root / "rewriter")
    a.save_adapter(root / "peft", format="peft")
    a.add_adapter(RULES.replace("[adapter]", '[adapter]\nname = "second"'))
    a.save_adapter(root / "two-rewriter")
    a.save_adapter(root / "two-peft", format="peft")
    return root


@pytest.fixture
def copy(good, tmp_path):
    def make(name):
        shutil.copytree(good / name, tmp_path / name)
        return tmp_path / name
    return make


def weights_of(path):
    return next(path.glob("adapter-*.safetensors")) if (path / MANIFEST).exists() else path / PEFT_WEIGHTS


def test_the_good_checkpoints_load(good):
    for name in ("rewriter", "peft"):
        a = model_with_an_adapter()
        a.load_adapter(good / name)
        assert list(a.adapters) == ["keep", "default"]


# ---- the safetensors header: length, JSON, offsets, dtypes, shapes ----------------------------------------

def _raw(header: bytes, body: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + body


def _header(entries: dict) -> bytes:
    return json.dumps(entries).encode()


HOSTILE_FILES = {
    "empty file": b"",
    "shorter than the length field": b"\x10\x00",
    "length 2^63": struct.pack("<Q", 2 ** 63) + b"{}",
    "length past the end of the file": struct.pack("<Q", 10 ** 6) + b'{"a": 1}',
    "200 MB header claimed": struct.pack("<Q", 200 * 2 ** 20) + b"{" + b" " * 4096,
    "header not JSON": _raw(b"\x00\xff not json"),
    "header a JSON list": _raw(b"[1, 2, 3]"),
    "tensor of 10^12 elements": _raw(_header({"x": {"dtype": "F32", "shape": [10 ** 12],
                                                    "data_offsets": [0, 4 * 10 ** 12]}})),
    "offsets past the data": _raw(_header({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}), b"\0" * 8),
    "overlapping tensors": _raw(_header({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                         "y": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}), b"\0" * 8),
    "shape disagrees with byte count": _raw(_header({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}),
                                            b"\0" * 8),
    "unknown dtype": _raw(_header({"x": {"dtype": "PICKLE", "shape": [2], "data_offsets": [0, 8]}}), b"\0" * 8),
    "negative dimension": _raw(_header({"x": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}), b"\0" * 8),
    "metadata not strings": _raw(_header({"__metadata__": {"format": 1}})),
}


@pytest.mark.parametrize("fmt", ["rewriter", "peft"])
@pytest.mark.parametrize("attack", sorted(HOSTILE_FILES))
def test_hostile_safetensors_headers_are_refused(copy, fmt, attack):
    path = copy(fmt)
    weights = weights_of(path)
    weights.write_bytes(HOSTILE_FILES[attack])
    refused(path, "not a valid safetensors file", names=weights)


class _CreatesAFileWhenUnpickled:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("fmt", ["rewriter", "peft"])
def test_pickles_are_never_unpickled(copy, tmp_path, fmt):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps({"weights": _CreatesAFileWhenUnpickled(marker)})
    path = copy(fmt)
    weights = weights_of(path)
    weights.write_bytes(payload)  # a pickle under the safetensors name
    refused(path, "not a valid safetensors file")
    weights.unlink()
    (path / "adapter_model.bin").write_bytes(payload)  # a pickle where PEFT's old format keeps it
    refused(path, "never unpickles", names=path)
    assert not marker.exists()


def test_a_pickle_beside_the_safetensors_file_is_ignored(copy, tmp_path):
    marker = tmp_path / "unpickled"
    path = copy("peft")
    (path / "adapter_model.bin").write_bytes(pickle.dumps(_CreatesAFileWhenUnpickled(marker)))
    a = model_with_an_adapter()
    a.load_adapter(path)
    assert "default" in a.adapters and not marker.exists()


# ---- tensor dtypes and values ---------------------------------------------------------------

def _retype(weights, dtype, poke=None):
    tensors = load_file(weights)
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].to(dtype)
    if poke is not None:
        tensors[key][0, 0] = poke
    save_file(tensors, weights)
    return key


@pytest.mark.parametrize("fmt", ["rewriter", "peft"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64])
def test_non_floating_tensors_are_refused(copy, fmt, dtype):
    path = copy(fmt)
    key = _retype(weights_of(path), dtype)
    error = refused(path, "must be floating point", names=weights_of(path))
    assert key in str(error) and str(dtype) in str(error)


@pytest.mark.parametrize("fmt", ["rewriter", "peft"])
def test_a_wide_float_that_overflows_the_adapter_dtype_is_refused(copy, fmt):
    path = copy(fmt)
    key = _retype(weights_of(path), torch.float64, poke=1e300)  # finite in float64, inf in float32
    error = refused(path, "too large for torch.float32", names=weights_of(path))
    assert key.removeprefix("base_model.model.") in str(error)


@pytest.mark.parametrize("poke", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_in_peft_checkpoints_are_refused(copy, poke):
    path = copy("peft")
    _retype(path / PEFT_WEIGHTS, torch.float32, poke=poke)
    refused(path, "NaN or Inf", names=path / PEFT_WEIGHTS)


def test_float8_weights_are_checked_too(copy):
    path = copy("rewriter")
    _retype(weights_of(path), torch.float8_e4m3fn, poke=float("nan"))
    refused(path, "NaN or Inf")


def test_lower_precision_weights_load_as_the_adapter_dtype(copy):
    path = copy("rewriter")
    tensors = load_file(weights_of(path))
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, weights_of(path))
    a = model_with_an_adapter()
    a.load_adapter(path)
    module = a.adapters["default"].modules["layers.0.up"]
    assert module.lora_A.dtype == torch.float32
    assert torch.equal(module.lora_A, tensors["sites/layers.0.up/lora_A"].to(torch.bfloat16).float())


# ---- PEFT-format variants -------------------------------------------------------------------

def _edit_tensors(weights, edit):
    tensors = load_file(weights)
    edit(tensors)
    save_file(tensors, weights)


PEFT_A = "base_model.model.layers.0.up.lora_A.weight"
PEFT_TENSOR_EDITS = {
    "a key missing": (lambda t: t.pop(PEFT_A), "missing 1 key"),
    "an unknown adapter key": (lambda t: t.update({"base_model.model.layers.0.up.lora_C.weight": torch.zeros(2)}),
                               "unexpected 1 key"),
    "a module the model lacks": (lambda t: t.update({"base_model.model.encoder.dense.weight": torch.zeros(2)}),
                                 "unexpected"),
    "a misshapen tensor": (lambda t: t.update({PEFT_A: torch.zeros(5, 32)}),
                           r"checkpoint \(5, 32\) vs model \(4, 32\)"),
    "a DoRA magnitude vector": (lambda t: t.update({PEFT_A.replace("lora_A.weight", "lora_magnitude_vector"):
                                                    torch.ones(64)}), "unexpected"),
}


@pytest.mark.parametrize("case", sorted(PEFT_TENSOR_EDITS))
def test_peft_tensors_that_do_not_fit_are_named(copy, case):
    edit, match = PEFT_TENSOR_EDITS[case]
    path = copy("peft")
    _edit_tensors(path / PEFT_WEIGHTS, edit)
    refused(path, match, names=path / PEFT_WEIGHTS)


PEFT_CONFIG_EDITS = {
    "an unsupported peft_type": ({"peft_type": "PROMPT_TUNING"}, "not supported"),
    "a larger r than the weights": ({"r": 8}, "shape mismatch"),
    "r = 0": ({"r": 0}, "must be >= 1"),
    "a dropout of 1.5": ({"lora_dropout": 1.5}, r"\[0, 1\)"),
    "targets the model lacks": ({"target_modules": ["q_proj"]}, "select no site|matched no module"),
    "an invalid target regex": ({"target_modules": "(up"}, "not a valid regular expression"),
    "a layers_pattern with a misplaced global flag": ({"layers_pattern": "(?i)layers", "layers_to_transform": [0]},
                                                      "not a valid regular expression"),
}
MISTYPED_PEFT_FIELDS = {
    "target_modules a number": {"target_modules": 5},
    "rank_pattern a list": {"rank_pattern": [1]},
    "modules_to_save holding a number": {"modules_to_save": [5]},
}


def _edit_config(path, change):
    config = json.loads((path / PEFT_CONFIG).read_text())
    (path / PEFT_CONFIG).write_text(json.dumps({**config, **change}))


@pytest.mark.parametrize("case", sorted(PEFT_CONFIG_EDITS))
def test_bad_peft_configs_are_refused(copy, case):
    change, match = PEFT_CONFIG_EDITS[case]
    path = copy("peft")
    _edit_config(path, change)
    a = model_with_an_adapter()
    before = snapshot(a)
    with pytest.raises(RewriterError, match=match) as info:
        a.load_adapter(path)
    assert str(path) in str(info.value)
    assert_same(before, snapshot(a))


@pytest.mark.parametrize("case", sorted(MISTYPED_PEFT_FIELDS))
def test_mistyped_peft_config_fields_are_refused(copy, case):
    path = copy("peft")
    _edit_config(path, MISTYPED_PEFT_FIELDS[case])
    a = model_with_an_adapter()
    before = snapshot(a)
    with pytest.raises(RewriterError, match="must be a") as info:
        a.load_adapter(path)
    assert str(path) in str(info.value)
    assert_same(before, snapshot(a))


def test_a_peft_config_that_is_not_utf8_is_refused(copy):
    path = copy("peft")
    (path / PEFT_CONFIG).write_bytes(b'{"peft_type": "\xff"}')
    refused(path, "cannot read PEFT config")


# ---- manifest tampering ---------------------------------------------------------------------

def _site(m):
    return m["plan"]["sites"][0]


MANIFEST_EDITS = {
    "weights outside the directory (absolute)": (lambda m: m.update(weights="/etc/hostname"), "file name inside"),
    "weights outside the directory (relative)": (lambda m: m.update(weights="../peft/adapter_model.safetensors"),
                                                 "file name inside"),
    "weights not a string": (lambda m: m.update(weights=["a"]), "file name inside"),
    "weights naming the rules file": (lambda m: m.update(weights="rules.toml"), "not a valid safetensors"),
    "a site listed twice": (lambda m: m["plan"]["sites"].append(dict(_site(m))), "appear more than once"),
    "plan not a table": (lambda m: m.update(plan="all"), "invalid plan"),
    "sites not a list": (lambda m: m["plan"].update(sites={"a": 1}), "invalid plan"),
    "no sites": (lambda m: m["plan"].update(sites=[]), "invalid plan"),
    "params a list": (lambda m: _site(m).update(params=[4]), "invalid plan"),
    "site a list": (lambda m: _site(m).update(site=["layers.0.up"]), "invalid plan"),
    "train entries without module": (lambda m: m["plan"].update(train=[{"rule": "x"}]), "invalid plan"),
    "a method that does not exist": (lambda m: _site(m).update(method="lorra"), "unknown method"),
    "an impossible rank": (lambda m: _site(m).update(params={**_site(m)["params"], "r": -1}), "must be >= 1"),
    "a larger rank than the weights": (lambda m: _site(m).update(params={**_site(m)["params"], "r": 8}),
                                       "shape mismatch"),
    "a method the plan does not use": (lambda m: m.update(method="adalora"), "not one of the plan's methods"),
    "extra data for a method without any": (lambda m: m.update(site_extra={"layers.0.up": {"r": 1}}), "site_extra"),
    "a module to train the model lacks": (lambda m: m["plan"].update(train=[{"module": "encoder", "rule": "x"}]),
                                          "no module 'encoder'"),
    "format version 2": (lambda m: m.update(format_version=2), "not supported"),
    "another format": (lambda m: m.update(format="peft"), "not a rewriter manifest"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_EDITS))
def test_tampered_manifests_are_refused(copy, case):
    edit, match = MANIFEST_EDITS[case]
    path = copy("rewriter")
    manifest = json.loads((path / MANIFEST).read_text())
    edit(manifest)
    (path / MANIFEST).write_text(json.dumps(manifest))
    refused(path, match)


@pytest.mark.parametrize("content", [b"\xff\xfe not utf-8", b"{ not json", b"[1, 2]", b""])
def test_unreadable_manifests_are_refused(copy, content):
    path = copy("rewriter")
    (path / MANIFEST).write_bytes(content)
    refused(path, "manifest", names=path / MANIFEST)


def test_an_invalid_adapter_name_in_the_manifest_is_refused(copy):
    path = copy("rewriter")
    manifest = json.loads((path / MANIFEST).read_text())
    (path / MANIFEST).write_text(json.dumps({**manifest, "adapter": "../../etc"}))
    a = model_with_an_adapter()
    before = snapshot(a)
    with pytest.raises(RewriterError, match="must be an identifier"):
        a.load_adapter(path)
    assert_same(before, snapshot(a))


def test_an_adapter_name_already_on_the_model_is_refused(copy):
    path = copy("rewriter")
    a = model_with_an_adapter()
    a.load_adapter(path)
    before = snapshot(a)
    with pytest.raises(RewriterError, match="already exists"):
        a.load_adapter(path)
    assert_same(before, snapshot(a))


# ---- several adapters: all or nothing -------------------------------------------------------

@pytest.mark.parametrize("fmt", ["rewriter", "peft"])
@pytest.mark.parametrize("damage", ["nan", "truncated", "missing weights"])
def test_when_a_later_adapter_is_bad_none_is_loaded(copy, fmt, damage):
    path = copy(f"two-{fmt}")
    assert sorted(p.name for p in path.iterdir()) == ["default", "second"]
    weights = weights_of(path / "second")
    if damage == "nan":
        _retype(weights, torch.float32, poke=float("nan"))
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-16])
    else:
        weights.unlink()
    refused(path, "NaN or Inf|not a valid safetensors|missing", names=path / "second")


def test_a_root_adapter_is_not_loaded_when_a_sub_directory_adapter_is_bad(copy, good):
    path = copy("peft")  # PEFT's layout: "default" at the root, further adapters in sub-directories
    shutil.copytree(good / "two-peft" / "second", path / "second")
    _retype(path / "second" / PEFT_WEIGHTS, torch.int64)
    refused(path, "must be floating point", names=path / "second")
    a = model_with_an_adapter()
    shutil.copy(good / "two-peft" / "second" / PEFT_WEIGHTS, path / "second" / PEFT_WEIGHTS)
    a.load_adapter(path)  # repaired: both load
    assert list(a.adapters) == ["keep", "default", "second"]
