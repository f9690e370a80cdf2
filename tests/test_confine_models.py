"""``load_model(spec, root=)``: a model config inside the data root can name only weights inside
it, the zoo's URLs or the mirror; nothing else is read, copied or requested. Each test failed on
nbapp before the hardening issue (15).
"""

from __future__ import annotations

import http.server
import json
import threading
import zipfile

import pytest
import torch

from models import TinyNet
from nbapp import cli
from nbapp.errors import ModelError
from nbapp.models import cache_dir, load_model
from nbapp.models.config import MIRROR_ENV
from nbapp.models.zoo import trusted_url

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*:DeprecationWarning")

CONFIG = """class_names: {{1: mito}}
labels: [1]
thing_list: [1]
model: {model}
padding_factor: 16
norms: {{mean: 0.5, std: 0.1}}
"""


@pytest.fixture
def layout(tmp_path, monkeypatch):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    torch.jit.script(TinyNet()).save(str(outside / "outside.pt"))
    torch.jit.script(TinyNet()).save(str(root / "inside.pt"))
    monkeypatch.setenv("NBAPP_CACHE", str(tmp_path / "cache"))
    return root, outside


class Counting(http.server.BaseHTTPRequestHandler):
    hits: list = []

    def do_GET(self):  # noqa: N802 (http.server API)
        Counting.hits.append(self.path)
        body = (self.server.payload or b"")
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(layout):
    root, outside = layout
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Counting)
    httpd.payload = (outside / "outside.pt").read_bytes()
    Counting.hits = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("how", ["absolute", "relative"])
def test_config_naming_weights_outside_the_root_is_refused(layout, how):
    root, outside = layout
    model = str(outside / "outside.pt") if how == "absolute" else "../outside/outside.pt"
    (root / "m.yaml").write_text(CONFIG.format(model=model))
    with pytest.raises(ModelError, match="is outside the data root"):
        load_model("m.yaml", device="cpu", root=root)
    # the same config loads for a local user (no root)
    assert load_model(root / "m.yaml", device="cpu").config.name == "m"


def test_config_inside_the_root_naming_weights_inside_loads(layout):
    root, _ = layout
    (root / "sub").mkdir()
    (root / "sub" / "m.yaml").write_text(CONFIG.format(model="../inside.pt"))
    model = load_model("sub/m.yaml", device="cpu", root=root)
    assert model.weights == str((root / "inside.pt").resolve())


def test_file_url_is_refused_and_nothing_is_copied(layout, tmp_path):
    root, _ = layout
    (root / "m.yaml").write_text(CONFIG.format(model="file:///etc/passwd"))
    with pytest.raises(ModelError, match="not a known model download"):
        load_model("m.yaml", device="cpu", root=root)
    assert not (tmp_path / "cache").exists()


def test_url_of_another_server_sends_no_request(layout, server):
    root, _ = layout
    (root / "m.yaml").write_text(CONFIG.format(model=f"{server}/x.pt"))
    with pytest.raises(ModelError, match="not a known model download"):
        load_model("m.yaml", device="cpu", root=root)
    assert Counting.hits == []
    # without a root the download is the user's own choice, and happens
    assert load_model(root / "m.yaml", device="cpu").config.name == "m"
    assert Counting.hits == ["/x.pt"]


def test_the_mirror_is_trusted(layout, server, monkeypatch):
    root, _ = layout
    monkeypatch.setenv(MIRROR_ENV, f"{server}/models")
    (root / "m.yaml").write_text(CONFIG.format(model=f"{server}/models/MitoNet_v1.pth"))
    load_model("m.yaml", device="cpu", root=root)
    assert Counting.hits == ["/models/MitoNet_v1.pth"]
    assert not trusted_url(f"{server}/models/../x.pth")
    assert not trusted_url(f"{server}/other/x.pth")


def test_quantized_weights_are_confined_too(layout):
    root, outside = layout
    (root / "m.yaml").write_text(CONFIG.format(model="inside.pt")
                                 + f"model_quantized: {outside / 'outside.pt'}\n")
    with pytest.raises(ModelError, match="model_quantized .* is outside the data root"):
        load_model("m.yaml", device="cpu", root=root)


@pytest.mark.parametrize("spec", ["../outside/outside.pt", "/etc/passwd", "link.pt"])
def test_model_path_outside_the_root_is_refused(layout, spec):
    root, outside = layout
    (root / "link.pt").symlink_to(outside / "outside.pt")
    with pytest.raises(ModelError, match="outside the data root"):
        load_model(spec, device="cpu", root=root)


def test_config_beside_a_torchscript_file_is_confined(layout):
    root, outside = layout
    (outside / "evil.yaml").write_text(CONFIG.format(model="x.pt"))
    (root / "inside.yaml").symlink_to(outside / "evil.yaml")
    with pytest.raises(ModelError, match="outside the data root"):
        load_model("inside.pt", device="cpu", root=root)


def test_default_and_in_memory_models_need_no_root_check(layout):
    root, _ = layout
    assert load_model("default", device="cpu", warm_up=False, root=root).config.name
    assert load_model(torch.jit.script(TinyNet()), device="cpu", root=root)


def test_cache_is_untouched_by_refused_configs(layout, tmp_path, server):
    root, _ = layout
    for i, model in enumerate(["file:///etc/passwd", f"{server}/x.pt", "/etc/passwd"]):
        (root / f"m{i}.yaml").write_text(CONFIG.format(model=model))
        with pytest.raises(ModelError):
            load_model(f"m{i}.yaml", device="cpu", root=root)
    assert not cache_dir().exists() or not any(cache_dir().rglob("*"))


# --------------------------------------------------------------------------------------------
# 8. an embedded config of the wrong shape is one line, not AttributeError


def with_embedded(path, text: str) -> None:
    torch.jit.script(TinyNet()).save(str(path), _extra_files={"nbapp_config.yaml": text})


@pytest.mark.parametrize("text, match", [
    ("- 1\n- 2\n", "must be a mapping of fields, got list"),
    ("labels: 3\n", "fields of the wrong type"),
    ("class_names: [a, b]\n", "fields of the wrong type"),
    ("norms: {mean: x}\n", "fields of the wrong type"),
    ("a: [\n", "not valid YAML"),
])
def test_bad_embedded_config_is_a_model_error(tmp_path, text, match):
    with_embedded(tmp_path / "bad.pt", text)
    with pytest.raises(ModelError, match=match):
        load_model(tmp_path / "bad.pt", device="cpu")


def test_nbapp_info_on_a_bad_embedded_config_is_one_line(tmp_path, capsys):
    with_embedded(tmp_path / "bad.pt", "- 1\n- 2\n")
    assert cli.main(["info", str(tmp_path / "bad.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nbapp: error:") and "got list" in err and err.count("\n") == 1


def test_cli_data_root_confines_info(layout, capsys):
    root, outside = layout
    assert cli.main(["info", "--data-root", str(root), str(outside / "outside.pt")]) == 2
    assert "outside the data root" in capsys.readouterr().err
    assert cli.main(["info", "--json", "--data-root", str(root), "inside.pt"]) == 0
    assert json.loads(capsys.readouterr().out)["weights"].endswith("inside.pt")


def test_zip_check_reads_no_outside_file(layout):
    """The confinement comes before any file is opened (zipfile.is_zipfile is the first read)."""
    root, outside = layout
    assert zipfile.is_zipfile(outside / "outside.pt")
    with pytest.raises(ModelError, match="outside"):
        load_model(str(outside / "outside.pt"), device="cpu", root=root)


def test_nul_in_a_model_path_is_a_model_error(layout):
    root, _ = layout
    with pytest.raises(ModelError, match="NUL character"):
        load_model("a\0b.pt", device="cpu", root=root)
