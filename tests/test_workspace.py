"""Visitors of a served page: their own folders, exclusive writes, names, trusted model places
(issue 26 items 1, 2 and 4)."""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest
import tifffile
import torch

from models import TinyNet
from nbapp.confine import OutsideRootError
from nbapp.errors import InputError, ModelError
from nbapp.models import load_model
from nbapp.samples import demo_volume
from nbapp.workspace import (VISITORS_FOLDER, Workspace, check_name, claim, from_environment,
                             release, reserve_numbered)

ALICE, BOB = "a1" * 8, "b0" * 8


@pytest.mark.parametrize("name, why", [
    ("", "give a file name"), ("   ", "give a file name"),
    ("a\nb.tif", "U+000A"), ("x\x00.tif", "U+0000"), ("a/b.tif", "'/'"), ("..", "starts with a dot"),
    (".hidden.tif", "starts with a dot"), ("a\\b.tif", "'\\'"), ("é.tif", "'é'"),
    ("x" * 121 + ".tif", "at most 120"), ("a;b|c.tif", "characters that are not allowed"),
])
def test_bad_names_are_refused_in_one_line(name, why):
    with pytest.raises(InputError) as err:
        check_name(name)
    assert why in str(err.value) and "\n" not in str(err.value)


def test_plain_names_pass():
    assert check_name("  my labels_2.v-1.tif ") == "my labels_2.v-1.tif"


def test_claim_never_replaces_and_threads_get_distinct_names(tmp_path):
    (tmp_path / "a.tif").write_bytes(b"someone's data")
    got = []
    threads = [threading.Thread(target=lambda: got.append(claim(tmp_path / "a.tif")))
               for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({p.name for p in got}) == 16 and "a.tif" not in {p.name for p in got}
    assert (tmp_path / "a.tif").read_bytes() == b"someone's data"
    folder = claim(tmp_path / "s.ome.zarr", folder=True)
    assert folder.is_dir() and claim(tmp_path / "s.ome.zarr", folder=True).name == "s-2.ome.zarr"
    release(folder)
    assert not folder.exists()
    (tmp_path / "full.tif").write_bytes(b"x")
    release(tmp_path / "full.tif")  # not a placeholder: kept
    assert (tmp_path / "full.tif").exists()


def test_two_fine_tunes_reserve_two_model_names(tmp_path):
    got = []
    threads = [threading.Thread(target=lambda: got.append(reserve_numbered(tmp_path, "tuned_", ".yaml")))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(p.name for p in got) == [f"tuned_{i}.yaml" for i in range(1, 9)]


def test_environment_gives_the_visitors_workspace(tmp_path):
    ws = from_environment({"NBAPP_DATA_ROOT": str(tmp_path), "NBAPP_VISITOR": ALICE,
                           "NBAPP_MODEL_DIRS": f"{tmp_path}/m1:{tmp_path}/m2"})
    assert ws.served and ws.home == tmp_path / VISITORS_FOLDER / ALICE
    assert [d.name for d in ws.model_dirs] == ["m1", "m2"] and not ws.root_models
    assert from_environment({"NBAPP_DATA_ROOT": str(tmp_path), "NBAPP_VISITOR": ALICE,
                             "NBAPP_DATA_ROOT_MODELS": "1"}).root_models
    owner = from_environment({})
    assert not owner.served and owner.root is None and owner.root_models
    with pytest.raises(InputError, match="not a hex id"):
        Workspace(root=tmp_path, visitor="../etc")
    with pytest.raises(InputError, match="needs a data root"):
        Workspace(visitor=ALICE)


# -- two visitors of one server ------------------------------------------------------------------

@pytest.fixture
def root(tmp_path):
    """A data root with two colleagues' raw data and a model file someone dropped there."""
    tifffile.imwrite(tmp_path / "alice_data.tif", np.full((8, 8), 7, np.uint8))
    (tmp_path / "bob.zarr").mkdir()
    (tmp_path / "bob.zarr" / "keep").write_bytes(b"bob's chunks")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(TinyNet().eval()).save(str(tmp_path / "dropped.pt"))
    return tmp_path


def _app(root, visitor, **kw):
    from nbapp.ui import App

    img, _ = demo_volume(shape=(8, 64, 64), n_mito=2)
    ws = Workspace(root=root, visitor=visitor, **kw)
    return App(volume=img, model=load_model(TinyNet(), device="cpu"), device="cpu",
               synchronous=True, workspace=ws)


def test_visitors_write_only_into_their_own_folders_and_never_replace(root):
    alice, bob = _app(root, ALICE), _app(root, BOB)
    try:
        for a in (alice, bob):
            for name in ("alice_data.tif", "bob.zarr", "labels.tif"):
                assert a.session.export_labels(name) is not None, a.state.status
        # the data root's files are intact, and nothing was written beside them
        assert tifffile.imread(root / "alice_data.tif").max() == 7
        assert (root / "bob.zarr" / "keep").read_bytes() == b"bob's chunks"
        assert sorted(p.name for p in root.iterdir()) == [
            "alice_data.tif", "bob.zarr", "dropped.pt", VISITORS_FOLDER]
        for v in (ALICE, BOB):
            assert sorted(p.name for p in (root / VISITORS_FOLDER / v / "exports").iterdir()) == [
                "alice_data.tif", "bob.zarr", "labels.tif"]
        # a second export of the same name is a new file; the first stays
        first = (root / VISITORS_FOLDER / ALICE / "exports" / "labels.tif").read_bytes()
        assert alice.session.export_labels("labels.tif").name == "labels-2.tif"
        assert (root / VISITORS_FOLDER / ALICE / "exports" / "labels.tif").read_bytes() == first
        # names: no folders, no hidden files, no control characters
        for bad in ("../x.tif", f"{VISITORS_FOLDER}/{BOB}/exports/labels.tif", ".x.tif",
                    "a\nb.tif", "/tmp/x.tif"):
            assert alice.session.export_labels(bad) is None
            assert alice.state.status_level == "error"
        assert not (root.parent / "x.tif").exists()
    finally:
        alice.close()
        bob.close()


def test_a_visitor_cannot_read_another_visitors_folder(root):
    alice, bob = _app(root, ALICE), _app(root, BOB)
    try:
        target = alice.session.export_labels("secret.tif")
        bob.session.load_path(f"{VISITORS_FOLDER}/{ALICE}/exports/secret.tif")
        assert bob.state.status_level == "error" and "another visitor's folder" in bob.state.status
        bob.session.load_path(f"{VISITORS_FOLDER}/{BOB}/../{ALICE}/exports/secret.tif")
        assert "another visitor's folder" in bob.state.status
        bob.session.load_path(VISITORS_FOLDER)
        assert "folder of the page's visitors" in bob.state.status
        alice.session.load_path(str(target.relative_to(root)))  # her own: fine
        assert alice.state.status_level != "error" and alice.state.data.name == "secret.tif"
        with pytest.raises(OutsideRootError):
            from nbapp.io import read_image

            read_image(str(target), root=bob.session.read_root)
    finally:
        alice.close()
        bob.close()


def test_visitors_have_separate_training_sets(root):
    alice, bob = _app(root, ALICE), _app(root, BOB)
    try:
        assert alice.session.add_to_training()
        assert len(alice.session.training_set().slices()) == 1
        assert bob.session.training_set().slices() == []
        assert alice.session.training_set().folder == root / VISITORS_FOLDER / ALICE / "training"
    finally:
        alice.close()
        bob.close()


def test_served_page_loads_models_only_from_trusted_places(root, tmp_path_factory):
    admin = tmp_path_factory.mktemp("admin_models")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(TinyNet().eval()).save(str(admin / "lab.pt"))
    alice = _app(root, ALICE, model_dirs=(admin,))
    try:
        s = alice.session
        for spec in ("dropped.pt", str(root / "dropped.pt")):
            assert not s.load_model(spec, "cpu")
            assert "not one this server offers" in alice.state.status
            assert "load only where the administrator allows it" in alice.state.status
        assert s.load_model("lab.pt", "cpu") and alice.state.model_info["name"] == "lab"
        assert s.load_model(str(admin / "lab.pt"), "cpu")
        assert not s.load_model(str(admin / ".." / "x.pt"), "cpu")
        # her own fine-tunes (a model this server wrote for her)
        own = root / VISITORS_FOLDER / ALICE / "training" / "models"
        own.mkdir(parents=True)
        from nbapp.training.export import config_dict, write_yaml

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.script(TinyNet().eval()).save(str(own / "tuned_1.pt"))
        write_yaml(config_dict({"mean": 0.5, "std": 0.2}, "t", "tuned_1.pt"), own / "tuned_1.yaml")
        assert s.load_model("tuned_1", "cpu") and alice.state.model_info["name"] == "tuned_1"
        assert str(own / "tuned_1.yaml") in s.workspace.model_choices()
    finally:
        alice.close()
    bob = _app(root, BOB, root_models=True)  # the administrator opted in
    try:
        assert bob.session.load_model("dropped.pt", "cpu")
        # ... but another visitor's fine-tune stays hers
        assert not bob.session.load_model(
            f"{VISITORS_FOLDER}/{ALICE}/training/models/tuned_1.yaml", "cpu")
        assert "another visitor's folder" in bob.state.status
        with pytest.raises(ModelError, match="not one this server offers"):
            Workspace(root=root, visitor=BOB).model_source("dropped.pt")
    finally:
        bob.close()


def test_a_notebook_owner_keeps_model_files_and_paths(root):
    ws = Workspace(root=root)
    assert ws.model_source("dropped.pt")[0] == "dropped.pt"
    assert ws.export_target("sub/../x.tif") == root.resolve() / "x.tif"
    assert ws.export_target("x.tif") == root / "nbapp-exports" / "x.tif"


def test_claims_that_cannot_be_made_say_why(tmp_path):
    (tmp_path / "a.tif").write_bytes(b"1")
    (tmp_path / "a-2.tif").write_bytes(b"2")
    with pytest.raises(InputError, match="2 files named like 'a.tif' exist"):
        claim(tmp_path / "a.tif", attempts=2)
    with pytest.raises(InputError, match="cannot create .*No such file or directory"):
        claim(tmp_path / "missing" / "b.tif")
    reserve_numbered(tmp_path / "m", "tuned_", ".yaml")
    with pytest.raises(InputError, match="1 files named tuned_N.yaml exist"):
        reserve_numbered(tmp_path / "m", "tuned_", ".yaml", attempts=1)
    with pytest.raises(InputError, match="cannot create"):
        reserve_numbered(tmp_path / "a.tif" / "m", "tuned_", ".yaml")
    with pytest.raises(InputError, match="give a file name to export to"):
        Workspace(root=tmp_path).export_target("  ")
