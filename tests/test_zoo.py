"""The model zoo end to end against a download server on 127.0.0.1 serving stand-in TorchScript
files that follow each registry model's contract: listing, download once with progress, resume
after an interrupted transfer, cancel, a wrong hash, a 404, no network, the cache reused,
quantized files, the mirror, and the CLI."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading

import numpy as np
import pytest
import torch

from model_server import ModelServer
from models import standin_bytes
from nbapp import cli
from nbapp.errors import ModelError
from nbapp.models import load_model, zoo
from nbapp.models.config import MIRROR_ENV
from nbapp.models.download import DownloadCancelled, download

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*:DeprecationWarning")

REGISTRY = ["MitoNet_v1", "MitoNet_v1_mini", "NucleoNet_base_v2", "DropNet_base_v1"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NBAPP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def files():
    """Stand-in files under each registry model's file name, with their padding and classes."""
    out = {}
    for name in REGISTRY:
        for q in (False, True):
            entry = zoo.find(name, quantized=q)
            out["/" + entry.file_name] = standin_bytes(len(entry.config.labels),
                                                       entry.config.padding_factor, quantized=q)
    return out


@pytest.fixture
def server(files, cache, monkeypatch):
    srv = ModelServer(files)
    monkeypatch.setenv(MIRROR_ENV, srv.url)
    yield srv
    srv.close()


def test_zoo_lists_the_registry_with_its_facts():
    models = zoo.zoo()
    assert list(models)[:1] == ["default"]
    for name in REGISTRY:
        assert name in models and name + "_quantized" in models
        entry = models[name]
        assert entry.url.startswith("https://zenodo.org/")
        assert entry.citation and entry.licence and entry.architecture
    assert models["MitoNet_v1"].config.padding_factor == 16
    assert models["MitoNet_v1_mini"].config.padding_factor == 128
    assert models["NucleoNet_base_v2"].config.class_names == {1: "nuclei"}
    assert models["DropNet_base_v1"].config.class_names == {1: "lipid"}
    assert models["default"].pixel_size_nm == 10 and models["default"].bundled
    assert models["MitoNet_v1"].file_name == "MitoNet_v1.pth"


def test_name_downloads_once_with_progress_then_works_offline(server, cache):
    seen = []
    model = load_model("MitoNet_v1_mini", device="cpu",
                       progress=lambda done, total: seen.append((done, total)))
    size = len(server.files["/MitoNet_v1_mini.pth"])
    assert seen[-1] == (size, size) and seen[0][0] == 0
    assert model.config.padding_factor == 128 and model.config.name == "MitoNet_v1_mini"
    path = zoo.model_path("MitoNet_v1_mini")
    assert model.weights == str(path) and path.read_bytes() == server.files["/MitoNet_v1_mini.pth"]
    assert [h for h in server.hits if h[0] == "/MitoNet_v1_mini.pth"] == [("/MitoNet_v1_mini.pth", None)]
    server.close()  # offline now: the cache serves it
    again = load_model("MitoNet_v1_mini", device="cpu", progress=False)
    assert again.weights == model.weights
    assert not list(path.parent.glob("*.partial"))


def test_every_registry_standin_segments_through_the_engine(server, cache):
    from nbapp.engine import Engine

    for name in REGISTRY:
        model = load_model(name, device="cpu", progress=False)
        out = Engine(model).infer(np.random.default_rng(0).integers(0, 255, (2, 100, 130),
                                                                      dtype=np.uint8))
        assert out[0].sem.shape[-2:] == (100, 130), name


def test_interrupted_transfer_resumes_where_it_stopped(server, cache):
    body = server.files["/MitoNet_v1.pth"]
    server.cut_after = 10_000
    with pytest.raises(ModelError, match="connection broke after 10000 of"):
        zoo.fetch_model(zoo.find("MitoNet_v1"), progress=False, retries=0)
    target = zoo.model_path("MitoNet_v1")
    assert not target.exists()  # a partial file is never used
    partial = target.with_name(target.name + ".partial")
    assert partial.stat().st_size == 10_000
    assert zoo.fetch_model(zoo.find("MitoNet_v1"), progress=False).read_bytes() == body
    assert server.hits[-1] == ("/MitoNet_v1.pth", "bytes=10000-")
    assert not partial.exists()


def test_a_retry_resumes_within_one_call(server, cache):
    server.cut_after = 7_000
    path = zoo.fetch_model(zoo.find("MitoNet_v1"), progress=False, retries=1)
    assert path.read_bytes() == server.files["/MitoNet_v1.pth"]
    assert server.hits == [("/MitoNet_v1.pth", None), ("/MitoNet_v1.pth", "bytes=7000-")]


def test_server_without_range_sends_it_all_again(files, cache, monkeypatch):
    srv = ModelServer(files, ranges=False)
    monkeypatch.setenv(MIRROR_ENV, srv.url)
    try:
        srv.cut_after = 5_000
        with pytest.raises(ModelError):
            zoo.fetch_model(zoo.find("MitoNet_v1"), progress=False, retries=0)
        path = zoo.fetch_model(zoo.find("MitoNet_v1"), progress=False)
        assert path.read_bytes() == files["/MitoNet_v1.pth"]
    finally:
        srv.close()


def test_cancel_stops_the_download_and_keeps_what_arrived(server, cache):
    cancel = threading.Event()

    def progress(done, total):
        if done > 0:
            cancel.set()

    with pytest.raises(DownloadCancelled, match="cancelled"):
        load_model("MitoNet_v1", device="cpu", progress=progress, cancel=cancel)
    target = zoo.model_path("MitoNet_v1")
    assert not target.exists()
    assert target.with_name(target.name + ".partial").stat().st_size > 0


def test_wrong_hash_is_refused_and_nothing_is_kept(server, cache, monkeypatch):
    entry = zoo.find("MitoNet_v1")

    def with_hash(h):
        return dataclasses.replace(entry, config=dataclasses.replace(entry.config, sha256=h))

    bad = with_hash("0" * 64)
    with pytest.raises(ModelError, match="SHA-256.*expected 0000"):
        zoo.fetch_model(bad, progress=False, retries=0)
    assert not zoo.model_path("MitoNet_v1").exists()
    good = hashlib.sha256(server.files["/MitoNet_v1.pth"]).hexdigest()
    assert zoo.fetch_model(with_hash(good), progress=False).is_file()
    with pytest.raises(ModelError, match="delete"):  # the cached file does not match
        zoo.fetch_model(bad, progress=False, retries=0)


def test_404_names_the_url_and_where_the_file_goes(server, cache):
    del server.files["/DropNet_base_v1.pth".replace("DropNet_base_v1.pth",
                                                    zoo.find("DropNet_base_v1").file_name)]
    with pytest.raises(ModelError, match=r"HTTP 404.*nbapp models --path DropNet_base_v1"):
        load_model("DropNet_base_v1", device="cpu", progress=False)


def test_offline_is_one_line_naming_url_and_path(cache, monkeypatch):
    monkeypatch.setenv(MIRROR_ENV, "http://127.0.0.1:9")
    with pytest.raises(ModelError) as info:
        zoo.fetch_model(zoo.find("MitoNet_v1"), progress=False, retries=0)
    text = str(info.value)
    assert "\n" not in text and "http://127.0.0.1:9/MitoNet_v1.pth" in text
    assert str(zoo.model_path("MitoNet_v1")) in text and "no network" in text


def test_file_put_by_hand_is_used_offline(cache, monkeypatch):
    monkeypatch.setenv(MIRROR_ENV, "http://127.0.0.1:9")
    path = zoo.model_path("MitoNet_v1")
    path.parent.mkdir(parents=True)
    path.write_bytes(standin_bytes(1, 16))
    assert load_model("MitoNet_v1", device="cpu").weights == str(path)


def test_mirror_url_appends_the_file_name(monkeypatch):
    monkeypatch.setenv(MIRROR_ENV, "https://models.example.org/em/")
    assert zoo.download_url(zoo.find("MitoNet_v1")) == "https://models.example.org/em/MitoNet_v1.pth"
    monkeypatch.delenv(MIRROR_ENV)
    assert zoo.download_url(zoo.find("MitoNet_v1")).startswith("https://zenodo.org/record/6861565/")


def test_quantized_file_runs_on_cpu(server, cache):
    model = load_model("MitoNet_v1", quantized=True, progress=False)
    assert model.device.type == "cpu" and model.config.name == "MitoNet_v1_quantized"
    assert model.weights.endswith("MitoNet_v1_quantized.pth")
    out = model(torch.zeros(1, 1, 32, 32), interpolate_ins=True)
    assert out["sem_logits"].shape == (1, 1, 32, 32)


def test_quantized_refusals_are_clear(server, cache, monkeypatch):
    with pytest.raises(ModelError, match="no quantized variant"):
        load_model("default", quantized=True)
    with pytest.raises(ModelError, match="needs a zoo model name"):
        load_model("some.pt", quantized=True)
    from nbapp.models import loader

    with pytest.raises(ModelError, match="CPU only"):
        loader.check_quantized(torch.device("cuda"))
    monkeypatch.setattr(loader, "quantized_engines", lambda: [])
    with pytest.raises(ModelError, match="cannot run quantized models"):
        load_model("MitoNet_v1", quantized=True, progress=False)


def test_download_helper_refuses_existing_file_with_other_hash(tmp_path):
    target = tmp_path / "m.pth"
    target.write_bytes(b"old")
    with pytest.raises(ModelError, match="delete"):
        download("http://127.0.0.1:9/m.pth", target, "1" * 64, progress=False, retries=0)
    assert target.read_bytes() == b"old"


def test_cli_models_lists_and_prints_paths(cache, capsys, monkeypatch):
    monkeypatch.delenv(MIRROR_ENV, raising=False)
    assert cli.main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = [r["name"] for r in rows]
    assert names[0] == "default" and "MitoNet_v1_quantized" in names
    mito = rows[names.index("MitoNet_v1")]
    assert mito["downloaded"] is False and mito["classes"] == ["mito"]
    assert mito["path"] == str(zoo.model_path("MitoNet_v1"))
    assert cli.main(["models"]) == 0
    table = capsys.readouterr().out
    assert "MitoNet_v1_mini" in table and "NucleoNet_base_v2" in table and "nuclei" in table
    assert cli.main(["models", "--path", "MitoNet_v1"]) == 0
    out = capsys.readouterr().out
    assert str(zoo.model_path("MitoNet_v1")) in out and "zenodo.org" in out
    assert cli.main(["models", "--path", "Nope"]) == 2
    assert "unknown model 'Nope'" in capsys.readouterr().err


def test_cli_segment_with_a_zoo_name(server, cache, tmp_path, capsys):
    import tifffile

    img = tmp_path / "img.tif"
    tifffile.imwrite(img, np.random.default_rng(1).integers(0, 255, (96, 96), dtype=np.uint8))
    out = tmp_path / "lab.tif"
    assert cli.main(["segment", str(img), "-o", str(out), "--model", "MitoNet_v1_mini",
                     "--quantized", "--device", "cpu"]) == 0
    assert tifffile.imread(out).shape == (96, 96)
    assert zoo.model_path("MitoNet_v1_mini_quantized").is_file()
    assert cli.main(["models", "--download", "MitoNet_v1"]) == 0
    assert zoo.model_path("MitoNet_v1").is_file()


def test_multi_class_model_counts_and_tables_per_class(tmp_path, capsys):
    """A two-class model: the CLI prints the count per class and the table names each object's
    class; the 2D viewer's line too."""
    import csv

    import tifffile
    import yaml

    from models import TinyNet

    torch.jit.script(TinyNet(classes=2, seed=3)).save(str(tmp_path / "two.pt"))
    (tmp_path / "two.yaml").write_text(yaml.safe_dump({
        "class_names": {1: "mito", 2: "er"}, "labels": [1, 2], "thing_list": [1, 2],
        "model": "two.pt", "padding_factor": 16, "norms": {"mean": 0.5, "std": 0.2}}))
    img = tmp_path / "img.tif"
    tifffile.imwrite(img, np.random.default_rng(2).integers(0, 255, (128, 128), dtype=np.uint8))
    code = cli.main(["segment", str(img), "-o", str(tmp_path / "l.tif"), "--model",
                     str(tmp_path / "two.yaml"), "--seg-threshold", "0.3", "--min-distance", "2",
                     "--table", str(tmp_path / "t.csv")])
    err = capsys.readouterr().err
    assert code == 0, err
    labels = tifffile.imread(tmp_path / "l.tif")
    classes = set(int(c) for c in np.unique(labels // 10000) if c)
    assert classes, "the stand-in must find objects"
    with open(tmp_path / "t.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    names = {1: "mito", 2: "er"}
    assert [r["class"] for r in rows] == [names[int(r["id"]) // 10000] for r in rows]
    for c in classes:
        n = int(np.count_nonzero(np.unique(labels[labels // 10000 == c])))
        assert f"{names[c]} {n}" in err


def test_cli_checks_input_and_output_before_downloading(server, cache, tmp_path, capsys):
    assert cli.main(["segment", str(tmp_path / "nope.tif"), "-o", str(tmp_path / "l.tif"),
                     "--model", "MitoNet_v1"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["segment", str(tmp_path / "nope.tif"), "-o", str(tmp_path / "l.txt"),
                     "--model", "MitoNet_v1"]) == 2
    assert server.hits == [] and not zoo.model_path("MitoNet_v1").exists()
