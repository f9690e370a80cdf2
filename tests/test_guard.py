"""A TorchScript file is code: the operator allow-list (nbapp.models.guard) lets every real
segmentation model through and refuses crafted files before they run, through the API, the CLI
and the page's loader."""

from __future__ import annotations

import sys
import warnings
import zipfile
from pathlib import Path
from typing import Dict, Tuple

import pytest
import torch
from torch import Tensor, nn

from nbapp.errors import ModelError
from nbapp.models import load_model
from nbapp.models.guard import (ALLOWED_OPERATORS, check_archive, check_module, module_operators,
                                refused_operators)
from models import OracleNet, TinyNet, disks, standin_bytes

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _save(module: nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(module.eval()).save(str(path))
    return path


# -- crafted files --------------------------------------------------------------------------------

class Reader(nn.Module):
    """Honours the model contract, and reads a file it names into its output."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def forward(self, x: Tensor, render_steps: int = 2, interpolate_ins: bool = True) -> Dict[str, Tensor]:
        leak = torch.from_file(self.path, shared=False, size=8, dtype=torch.uint8).float()
        y = x * 0 + leak.sum()
        return {"sem_logits": y, "ctr_hmp": y, "offsets": torch.cat([y, y], 1)}


class Dropper(nn.Module):
    """A model whose loading (``__setstate__``) writes a file through a shared map: the
    ``.pth`` dropper (a ``.pth`` file in site-packages runs code at the next Python start)."""

    def __init__(self, target: str):
        super().__init__()
        self.target = target

    def forward(self, x: Tensor, render_steps: int = 2, interpolate_ins: bool = True) -> Dict[str, Tensor]:
        return {"sem_logits": x, "ctr_hmp": x, "offsets": torch.cat([x, x], 1)}

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, bool]:
        return (self.target, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, bool]) -> None:
        self.target = state[0]
        t = torch.from_file(self.target, shared=True, size=12, dtype=torch.uint8)
        t.fill_(35)  # '#'
        self.training = state[1] and bool(t.sum() > 0)


class Printer(nn.Module):
    def forward(self, x: Tensor, render_steps: int = 2, interpolate_ins: bool = True) -> Dict[str, Tensor]:
        print(x.shape)
        return {"sem_logits": x, "ctr_hmp": x, "offsets": torch.cat([x, x], 1)}


def _rewrite(src: Path, dst: Path, old: str, new: str) -> Path:
    """A copy of the TorchScript file ``src`` whose stored source has ``old`` replaced."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        done = False
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename.endswith(".py") and old.encode() in data:
                data, done = data.replace(old.encode(), new.encode()), True
            zout.writestr(item, data)
    assert done, f"{old!r} is not in {src}'s source"
    return dst


@pytest.fixture
def victim(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"top secret data")
    return secret


@pytest.fixture
def crafted(tmp_path, victim):
    """name -> crafted TorchScript file; every one of them must be refused before it runs."""
    reader = _save(Reader(str(victim)), tmp_path / "reader.pt")
    dropper = _save(Dropper(str(tmp_path / "evil.pth")), tmp_path / "dropper.pt")
    return {
        "reader": reader,
        "dropper": dropper,
        "printer": _save(Printer(), tmp_path / "printer.pt"),
        # the same call written other ways in a hand-made file
        "ops-namespace": _rewrite(reader, tmp_path / "r2.pt", "torch.from_file(",
                                  "ops.aten.from_file("),
        "alias": _rewrite(reader, tmp_path / "r3.pt", "_0 = torch.from_file(",
                          "_9 = torch.from_file\n    _0 = _9("),
        "save": _rewrite(reader, tmp_path / "r4.pt", "torch.from_file(", "torch.save("),
        "method": _rewrite(reader, tmp_path / "r5.pt", "torch.from_file(path, ",
                           "x.set_(path, "),
    }


# -- the allow-list lets real models through ----------------------------------------------------

def _bench_mitonet():
    sys.path.insert(0, str(BENCH))
    try:
        import bench_mitonet_speed
    finally:
        sys.path.remove(str(BENCH))
    return bench_mitonet_speed


class _Deepest(nn.Module):
    """An encoder's deepest features (int8 quantization needs one tensor out)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.quant = torch.ao.quantization.QuantStub()
        self.encoder = encoder
        self.dequant = torch.ao.quantization.DeQuantStub()

    def forward(self, x: Tensor) -> Tensor:
        return self.dequant(self.encoder(self.quant(x))[-1])


def _quantized(encoder: nn.Module) -> nn.Module:
    qnet = _Deepest(encoder).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qnet.qconfig = torch.ao.quantization.get_default_qconfig("x86")
        torch.ao.quantization.prepare(qnet, inplace=True)
        qnet(torch.rand(1, 1, 64, 64))
        torch.ao.quantization.convert(qnet, inplace=True)
    return qnet


def test_every_real_model_passes(tmp_path):
    """The shipped model, nbapp's own export (what fine-tunes write), the zoo contract's
    stand-ins (full and int8), the tests' networks and MitoNet_v1's architecture (scripted,
    frozen as empanada ships it, and its int8 encoder) use only allowed operators."""
    from nbapp.models.arch import build_model
    from nbapp.training.export import export_model

    mitonet = _bench_mitonet().build_mitonet_arch()
    files = {
        "default": Path(load_model("default", warm_up=False).weights),
        "export": tmp_path / "export.pt",
        "standin": tmp_path / "standin.pt",
        "standin-int8": tmp_path / "standin8.pt",
        "tiny": _save(TinyNet(), tmp_path / "tiny.pt"),
        "oracle": _save(OracleNet(disks()[None]), tmp_path / "oracle.pt"),
        "mitonet": _save(mitonet, tmp_path / "mitonet.pt"),
        "mitonet-encoder-int8": _save(_quantized(mitonet.encoder), tmp_path / "mitonet8.pt"),
    }
    export_model(build_model(), files["export"])
    files["standin"].write_bytes(standin_bytes())
    files["standin-int8"].write_bytes(standin_bytes(quantized=True))
    with warnings.catch_warnings():  # torch.jit.freeze's deprecation notice
        warnings.simplefilter("ignore")
        torch.jit.freeze(torch.jit.script(mitonet.eval())).save(str(tmp_path / "frozen.pt"))
    files["mitonet-frozen"] = tmp_path / "frozen.pt"
    for name, path in files.items():
        check_archive(path)
        with warnings.catch_warnings():  # torch.jit.load's deprecation notice
            warnings.simplefilter("ignore")
            check_module(torch.jit.load(str(path)), path)
    # and the loader takes them (the contract checked by a forward pass)
    for name in ("default", "export", "standin", "standin-int8", "tiny"):
        load_model(files[name], device="cpu")


def test_the_allow_list_names_real_operators_and_no_dangerous_one():
    import torch

    registered = {s.name for s in torch._C._jit_get_all_schemas()}
    language = {op for op in ALLOWED_OPERATORS if op.startswith("prim::")}
    unknown = sorted(op for op in ALLOWED_OPERATORS - registered - language)
    assert not unknown, f"allow-list entries that are no operator of this torch: {unknown}"
    for op in ("aten::from_file", "aten::save", "prim::Print", "prim::PythonOp", "aten::set_",
               "aten::_nested_tensor_storage_offsets", "prim::CallFunction", "prim::fork",
               "aten::wait", "prim::rpc_async", "prim::CreateObject", "aten::data_ptr"):
        assert op not in ALLOWED_OPERATORS


def test_module_operators_sees_inside_submodules_and_branches():
    class Inner(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            if x.sum() > 0:
                for _ in range(2):
                    x = torch.tanh(x)
            return x

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Inner()

        def forward(self, x: Tensor) -> Tensor:
            return self.inner(x)

    ops = module_operators(torch.jit.script(Outer()))
    assert {"aten::tanh", "prim::If", "prim::Loop"} <= set(ops)
    assert refused_operators(ops) == []


# -- crafted files are refused before they run ---------------------------------------------------

@pytest.mark.parametrize("name, op", [
    ("reader", "torch.from_file"), ("dropper", "torch.from_file"), ("printer", "print"),
    ("ops-namespace", "aten::from_file"), ("alias", "torch.from_file"), ("save", "torch.save"),
    ("method", "aten::set_"),
])
def test_crafted_files_are_refused_by_the_api_before_running(crafted, name, op, victim, tmp_path):
    with pytest.raises(ModelError) as err:
        load_model(crafted[name], device="cpu")
    msg = str(err.value)
    assert "\n" not in msg and "is refused: it calls" in msg and op in msg
    assert victim.read_bytes() == b"top secret data"
    assert not (tmp_path / "evil.pth").exists()  # the dropper's load-time code never ran


def test_without_the_guard_the_dropper_writes_its_file(crafted, tmp_path):
    """The probe is real: plain torch.jit.load runs the dropper's __setstate__."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.load(str(crafted["dropper"]))
    assert (tmp_path / "evil.pth").read_bytes() == b"#" * 12


def test_graph_check_refuses_what_the_source_check_did_not_see(tmp_path):
    """check_module decides on compiled graphs: an in-memory scripted module that prints."""
    with pytest.raises(ModelError, match=r"prim::Print \(in forward\)"):
        check_module(torch.jit.script(Printer()), "printer")
    check_module(Printer(), "eager")  # an nn.Module built in Python is its caller's own code


def test_unreadable_or_unparsable_source_is_refused(tmp_path):
    good = _save(TinyNet(), tmp_path / "tiny.pt")
    bad = _rewrite(good, tmp_path / "bad.pt", "def forward(", "def forward((")
    with pytest.raises(ModelError, match="cannot be parsed, so it cannot be checked"):
        check_archive(bad)
    lam = _rewrite(good, tmp_path / "lam.pt", "_2 = {", "_l = lambda: 0\n    _2 = {")
    with pytest.raises(ModelError, match="Lambda statement"):
        check_archive(lam)
    undefined = _rewrite(good, tmp_path / "undef.pt", "torch.relu(_1)",
                         "__torch__.nowhere.relu(_1)")
    with pytest.raises(ModelError, match="which the file does not define"):
        check_archive(undefined)
    with pytest.raises(ModelError, match="cannot read its TorchScript source"):
        check_archive(tmp_path / "missing.pt")


def test_cli_refuses_a_crafted_model_in_one_line(crafted, victim, tmp_path, capsys):
    import numpy as np
    import tifffile

    from nbapp.cli import main

    img = tmp_path / "img.tif"
    tifffile.imwrite(img, np.zeros((64, 64), np.uint8))
    for argv in (["info", str(crafted["dropper"])],
                 ["segment", str(img), "-o", str(tmp_path / "out.tif"), "--model",
                  str(crafted["reader"])]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "is refused: it calls torch.from_file" in err
    assert victim.read_bytes() == b"top secret data"
    assert not (tmp_path / "evil.pth").exists() and not (tmp_path / "out.tif").exists()


def test_worker_engines_refuse_it_too(crafted, tmp_path):
    """Worker processes and Dask workers load the model from its file with load_model."""
    from nbapp.cluster import worker_engine

    with pytest.raises(ModelError, match="is refused"):
        worker_engine(str(crafted["dropper"]), 2, "cpu")
    assert not (tmp_path / "evil.pth").exists()


