"""Model configs (empanada YAML), the download cache, loading and the model contract."""

from __future__ import annotations

import hashlib
import zipfile

import pytest
import torch
from models import BadNet, TinyNet

from nbapp import ModelError
from nbapp.models import fetch, load_model, read_config, resolve_device

MITONET_LIKE = """\
class_names:
  1: mito
description: |
  MitoNet-like config for tests.
labels: [1]
model: {model}
model_quantized: https://example.org/never_used_quantized.pth
norms: {{mean: 0.57571, std: 0.12765}}
padding_factor: 16
thing_list: [1]
"""


@pytest.fixture
def scripted(tmp_path):
    path = tmp_path / "tiny.pt"
    torch.jit.script(TinyNet()).save(str(path))
    return path


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NBAPP_CACHE", str(tmp_path / "cache"))


def test_mitonet_style_config_loads_unchanged(tmp_path, scripted):
    cfg_path = tmp_path / "MitoNet_like.yaml"
    cfg_path.write_text(MITONET_LIKE.format(model="tiny.pt"))
    cfg = read_config(cfg_path)
    assert cfg.name == "MitoNet_like"
    assert cfg.class_names == {1: "mito"} and cfg.labels == (1,) and cfg.thing_list == (1,)
    assert cfg.padding_factor == 16 and cfg.norms == (0.57571, 0.12765)
    assert cfg.model == str(scripted.resolve())  # relative to the YAML's folder
    assert cfg.description.startswith("MitoNet-like")


@pytest.mark.parametrize("missing", ["class_names", "labels", "thing_list", "model",
                                     "padding_factor", "norms"])
def test_missing_required_field_is_named(tmp_path, missing):
    text = "\n".join(line for line in MITONET_LIKE.format(model="m.pt").splitlines()
                     if not line.startswith(missing) and not (missing == "class_names" and "mito" in line))
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ModelError, match=f"missing required field.*{missing}"):
        read_config(p)


@pytest.mark.parametrize("text, message", [
    ("a: [1, 2\n", "not valid YAML"),
    ("- just\n- a list\n", "must be a mapping"),
    (MITONET_LIKE.format(model="m.pt").replace("thing_list: [1]", "thing_list: [2]"), "not in labels"),
    (MITONET_LIKE.format(model="m.pt").replace("padding_factor: 16", "padding_factor: -2"), "padding_factor"),
    (MITONET_LIKE.format(model="m.pt").replace("std: 0.12765", "std: 0"), "std finite and > 0"),
    (MITONET_LIKE.format(model="m.pt").replace("std: 0.12765", "std: .inf"), "std finite"),
    (MITONET_LIKE.format(model="m.pt").replace("mean: 0.57571", "mean: .nan"), "mean must be finite"),
    (MITONET_LIKE.format(model="m.pt").replace("{mean: 0.57571, std: 0.12765}", "[1, 2]"), "norms must be"),
    (MITONET_LIKE.format(model="m.pt").replace("labels: [1]", "labels: [mito]"), "integer class ids"),
    (MITONET_LIKE.format(model="m.pt").replace("labels: [1]", "labels: []"), "at least one"),
    (MITONET_LIKE.format(model="m.pt").replace("  1: mito\n", "").replace("class_names:", "class_names: {}"),
     "class_names must be"),
    (MITONET_LIKE.format(model="''"), "model must be a path or URL"),
    (MITONET_LIKE.format(model="m.pt").replace("std: 0.12765", "std: abc"), "must be numbers"),
])
def test_bad_configs_say_what_is_wrong(tmp_path, text, message):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ModelError, match=message):
        read_config(p)


def test_missing_config_file(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        read_config(tmp_path / "nope.yaml")


@pytest.fixture
def served(scripted):
    """``scripted`` served over HTTP on 127.0.0.1: (url, server)."""
    from model_server import ModelServer

    srv = ModelServer({"/tiny.pt": scripted.read_bytes()})
    yield f"{srv.url}/tiny.pt", srv
    srv.close()


def test_url_is_downloaded_once(tmp_path, scripted, served):
    url, srv = served
    first = fetch(url, progress=False)
    assert first.read_bytes() == scripted.read_bytes() and first.is_relative_to(tmp_path / "cache")
    digest = hashlib.sha256(scripted.read_bytes()).hexdigest()
    srv.close()  # the server is gone: a second fetch must come from the cache
    assert fetch(url, digest, progress=False) == first
    assert not [p for p in first.parent.iterdir() if p != first]


def test_download_hash_mismatch_is_an_error_and_leaves_nothing(tmp_path, served):
    with pytest.raises(ModelError, match="SHA-256"):
        fetch(served[0], sha256="0" * 64, progress=False)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_cached_file_with_other_hash_is_an_error(served):
    fetch(served[0], progress=False)
    with pytest.raises(ModelError, match="delete"):
        fetch(served[0], sha256="f" * 64, progress=False)


def test_local_file_with_other_hash_is_an_error(scripted):
    with pytest.raises(ModelError, match="has SHA-256 .* the config expects f"):
        fetch(scripted.resolve().as_uri(), sha256="f" * 64)
    assert fetch(scripted.resolve().as_uri()) == scripted.resolve()


def test_unreachable_url_is_a_clear_error():
    with pytest.raises(ModelError, match="cannot download.*no network.*put it at"):
        fetch("http://127.0.0.1:9/MitoNet_v1.pth", progress=False)


def test_other_url_schemes_are_refused():
    with pytest.raises(ModelError, match="only http"):
        fetch("ftp://127.0.0.1/m.pt", progress=False)


def test_missing_local_model_file(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        fetch(str(tmp_path / "none.pt"))


def test_yaml_with_url_loads_through_cache(tmp_path, served):
    cfg = tmp_path / "remote.yaml"
    cfg.write_text(MITONET_LIKE.format(model=served[0]))
    model = load_model(cfg, device="cpu")
    assert model.weights.startswith(str(tmp_path / "cache"))
    info = model.info()
    assert info["name"] == "remote" and info["classes"] == ["mito"]
    assert info["parameters"] == sum(p.numel() for p in TinyNet().parameters())
    assert not model.module.training


def test_torchscript_file_without_config_gets_documented_defaults(scripted):
    model = load_model(scripted, device="cpu")
    assert model.config.name == "tiny" and model.config.padding_factor == 16
    assert "without a config" in model.config.description


def test_torchscript_file_uses_sibling_yaml(tmp_path, scripted):
    (tmp_path / "tiny.yaml").write_text(MITONET_LIKE.format(model="tiny.pt").replace("16", "32"))
    assert load_model(scripted, device="cpu").config.padding_factor == 32


def test_config_embedded_in_torchscript(tmp_path):
    path = tmp_path / "emb.pt"
    torch.jit.save(torch.jit.script(TinyNet()), str(path), _extra_files={
        "nbapp_config.yaml": "class_names: {1: mito}\nlabels: [1]\nthing_list: [1]\n"
                             "padding_factor: 32\nnorms: {mean: 0.5, std: 0.2}\ndescription: hi\n"})
    cfg = load_model(path, device="cpu").config
    assert (cfg.padding_factor, cfg.norms, cfg.description) == (32, (0.5, 0.2), "hi")


def test_module_is_wrapped_in_eval_mode():
    net = TinyNet().train()
    model = load_model(net, device="cpu")
    assert not model.module.training and model.device == torch.device("cpu")
    assert load_model(model, device="cpu") is model


@pytest.mark.parametrize("content", [b"not a model at all", b"PK\x03\x04 truncated zip"])
def test_junk_model_files(tmp_path, content):
    p = tmp_path / "junk.pth"
    p.write_bytes(content)
    with pytest.raises(ModelError, match="TorchScript"):
        load_model(p, device="cpu")


def test_zip_that_is_not_torchscript(tmp_path):
    p = tmp_path / "weights.pth"
    torch.save({"w": torch.zeros(2)}, p)  # a plain state dict (also a zip)
    assert zipfile.is_zipfile(p)
    with pytest.raises(ModelError, match="not a loadable TorchScript"):
        load_model(p, device="cpu")


def test_unknown_specs():
    with pytest.raises(ModelError, match="does not exist"):
        load_model("no_such_model", device="cpu")
    with pytest.raises(ModelError, match="must be 'default'"):
        load_model(42, device="cpu")


@pytest.mark.parametrize("how, message", [
    ("keys", r"missing key\(s\) \['offsets'\]"),
    ("tensor", "must return a dict"),
    ("ctr_shape", r"'ctr_hmp' has shape .*expected \(1, 1, 16, 16\)"),
    ("sem_shape", "'sem_logits' has shape"),
    ("offsets_channels", r"'offsets' has shape \(1, 3, 16, 16\)"),
    ("signature", r"must accept \(x, render_steps"),
])
def test_contract_violations_are_named_on_first_use(how, message):
    with pytest.raises(ModelError, match=message):
        load_model(BadNet(how), device="cpu")  # warm-up checks the contract


@pytest.mark.parametrize("device, message", [
    ("cuda:7", "CUDA"), ("foo", "unknown device"), ("mps", "MPS"), ("meta", "unsupported device")])
def test_bad_devices(device, message):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("MPS is available here")
    with pytest.raises(ModelError, match=message):
        resolve_device(device)


def test_default_device_is_cpu_without_gpus():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert resolve_device(None).type in ("cpu", "mps")


class _FailsOnBigInputs(torch.nn.Module):
    def forward(self, x, render_steps: int = 2, interpolate_ins: bool = True):
        if x.shape[-1] > 64:
            raise RuntimeError("kernel size can't be greater than actual input size")
        return BadNet("none")(x, render_steps, interpolate_ins)


def test_model_failure_after_the_first_call_is_still_a_model_error():
    model = load_model(_FailsOnBigInputs(), device="cpu")
    with pytest.raises(ModelError, match="failed on an input of shape \\(1, 1, 128, 128\\)"):
        model(torch.zeros(1, 1, 128, 128), 2, False)


class _OOM(torch.nn.Module):
    def forward(self, x, render_steps: int = 2, interpolate_ins: bool = True):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")


def test_out_of_memory_is_a_memory_error():
    with pytest.raises(MemoryError, match="out of memory"):
        load_model(_OOM(), device="cpu")


def test_a_quantized_models_parameter_count_includes_its_packed_weights(tmp_path):
    """Issue 30 item 14: the quantized MitoNet said '273,412 parameters' (its packed int8
    weights were not counted)."""
    from models import standin_bytes

    full = tmp_path / "full.pt"
    full.write_bytes(standin_bytes())
    q = tmp_path / "q.pt"
    q.write_bytes(standin_bytes(quantized=True))
    n_full = load_model(full, device="cpu").parameters
    assert n_full == 8 * 1 * 3 * 3 + 8 + 4 * 8 + 4  # stem and heads convolutions
    assert load_model(q, device="cpu").parameters == n_full
