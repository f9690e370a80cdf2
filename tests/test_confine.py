"""The trust boundary in the core: ``read_image(path, root=)`` refuses everything that resolves
outside the data root, in every format; decoded sizes are checked before decoding; corrupt and
hostile files give one-line errors; dead writers' temporaries are cleaned up.

Each test here failed on nbapp before the hardening issue (15), for the reason its name gives.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from files import png_chunk, png_of_zeros, save_as
from nbapp import io as nio
from nbapp import memory
from nbapp.confine import OutsideRootError, confine, confine_tree
from nbapp.errors import InputError
from nbapp.io import check_writable, read_image, remove_stale_temporaries, write_labels
from nbapp.memory import OutOfMemory

h5py = pytest.importorskip("h5py")
tifffile = pytest.importorskip("tifffile")
zarr = pytest.importorskip("zarr")

SECRET = b"root:x:0:0:root:/root:/bin/bash\n" * 32  # what must never come back as pixels


@pytest.fixture
def layout(tmp_path):
    """A data root and a folder beside it holding what a visitor must not read."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_bytes(SECRET)
    return root, outside


def zarr_array(path: Path, data: np.ndarray) -> None:
    z = zarr.open(str(path), mode="w", shape=data.shape, dtype=data.dtype,
                  chunks=data.shape)
    z[...] = data


@pytest.fixture
def secret_store(layout):
    """(root, outside, the outside store): a zarr array of 7s that must never be read."""
    root, outside = layout
    zarr_array(outside / "secret.zarr", np.full((8, 8), 7, np.uint8))
    return root, outside, outside / "secret.zarr"


# --------------------------------------------------------------------------------------------
# confine itself


def test_confine_resolves_relative_paths_from_the_root(layout):
    root, _ = layout
    (root / "a.tif").write_bytes(b"x")
    assert confine("a.tif", root) == root.resolve() / "a.tif"
    assert confine(str(root / "sub" / ".." / "a.tif"), root) == root.resolve() / "a.tif"


@pytest.mark.parametrize("text", ["../outside/secret.txt", "/etc/passwd", "sub/../../x"])
def test_confine_refuses_paths_outside(layout, text):
    root, _ = layout
    with pytest.raises(OutsideRootError, match="outside the data root"):
        confine(text, root)


def test_confine_refuses_a_link_out_of_the_root(layout):
    root, outside = layout
    (root / "link.tif").symlink_to(outside / "secret.txt")
    with pytest.raises(OutsideRootError):
        confine("link.tif", root)


def test_confine_errors(layout, tmp_path):
    root, _ = layout
    with pytest.raises(InputError, match="no path given"):
        confine("  ", root)
    with pytest.raises(InputError, match="not an existing folder"):
        confine("a.tif", tmp_path / "missing")
    assert confine("~/x", None) == Path(os.path.expanduser("~/x"))
    confine_tree(tmp_path / "anything", None)  # no root: nothing to check


# --------------------------------------------------------------------------------------------
# 1. HDF5: external storage, virtual datasets, external links


def test_h5_external_storage_outside_the_root_is_refused(layout):
    root, outside = layout
    path = root / "ext.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("raw", shape=(32, 32), dtype="u1",
                         external=[(str(outside / "secret.txt"), 0, 1024)])
    with pytest.raises(InputError, match="external file"):
        read_image(path, root=root)
    # without a root (a local user's own file) external storage still reads
    arr, _ = read_image(path)
    assert arr.tobytes() == SECRET[:1024]


def test_h5_virtual_dataset_is_refused_in_the_root(layout):
    root, outside = layout
    with h5py.File(outside / "src.h5", "w") as f:
        f["data"] = np.arange(16, dtype="u1").reshape(4, 4)
    layout_ = h5py.VirtualLayout(shape=(4, 4), dtype="u1")
    layout_[:] = h5py.VirtualSource(str(outside / "src.h5"), "data", shape=(4, 4))
    with h5py.File(root / "vds.h5", "w") as f:
        f.create_virtual_dataset("raw", layout_)
    with pytest.raises(InputError, match="virtual dataset"):
        read_image(root / "vds.h5", root=root)


def test_h5_external_link_is_not_followed(layout):
    root, outside = layout
    with h5py.File(outside / "src.h5", "w") as f:
        f["data"] = np.arange(16, dtype="u1").reshape(4, 4)
    with h5py.File(root / "link.h5", "w") as f:
        f["raw"] = h5py.ExternalLink(str(outside / "src.h5"), "data")
    with pytest.raises(InputError, match="holds no datasets"):
        read_image(root / "link.h5", root=root)
    with pytest.raises(InputError):
        read_image(f"{root / 'link.h5'}:raw", root=root)


# --------------------------------------------------------------------------------------------
# 3. zarr: symbolic links anywhere in the store, `..` in the node path


def test_zarr_whose_array_is_a_link_out_of_the_root_is_refused(secret_store):
    root, _, secret = secret_store
    zarr.open_group(str(root / "in.zarr"), mode="w")
    (root / "in.zarr" / "raw").symlink_to(secret)
    with pytest.raises(OutsideRootError, match="zarr node 'raw' is outside"):
        read_image(f"{root / 'in.zarr'}/raw", root=root)


def test_zarr_whose_chunk_folder_is_a_link_out_of_the_root_is_refused(secret_store):
    root, _, secret = secret_store
    zarr_array(root / "in.zarr", np.ones((8, 8), np.uint8))  # zeros would store no chunk
    # zarr v3 keeps chunks in c/, v2 beside .zarray: link each to the outside store's
    chunks = [p for p in (root / "in.zarr").iterdir() if p.name == "c" or p.name[0].isdigit()]
    assert chunks, "expected a chunk file or folder"
    for c in chunks:
        if c.is_dir():
            shutil.rmtree(c)
        else:
            c.unlink()
        c.symlink_to(secret / c.name)
    with pytest.raises(OutsideRootError):
        read_image(root / "in.zarr", root=root)


def test_zarr_node_cannot_climb_out_of_its_store(secret_store):
    root, _, secret = secret_store
    zarr_array(root / "in.zarr", np.zeros((8, 8), np.uint8))
    rel = os.path.relpath(secret, root / "in.zarr")
    with pytest.raises(OutsideRootError):
        read_image(f"{root / 'in.zarr'}/{rel}", root=root)


def test_zarr_inside_the_root_with_inner_links_reads(layout):
    root, _ = layout
    zarr_array(root / "a.zarr", np.full((4, 4), 3, np.uint8))
    group = zarr.open_group(str(root / "g.zarr"), mode="w")
    group.attrs["x"] = 1
    (root / "g.zarr" / "raw").symlink_to(root / "a.zarr")
    arr, _ = read_image(f"{root / 'g.zarr'}/raw", root=root)
    assert arr.sum() == 48


# --------------------------------------------------------------------------------------------
# plain files and OME-TIFF companions


def test_file_link_out_of_the_root_is_refused_for_every_format(layout):
    root, outside = layout
    np.save(outside / "v.npy", np.ones((4, 4), np.uint8))
    (root / "v.npy").symlink_to(outside / "v.npy")
    with pytest.raises(OutsideRootError):
        read_image("v.npy", root=root)
    with pytest.raises(OutsideRootError):
        read_image(root / ".." / "outside" / "v.npy", root=root)


def test_relative_path_is_read_from_the_root(layout):
    root, _ = layout
    np.save(root / "v.npy", np.arange(4, dtype=np.uint8).reshape(2, 2))
    arr, _ = read_image("v.npy", root=root)
    assert arr.tolist() == [[0, 1], [2, 3]]


def test_ome_tiff_companion_outside_the_root_is_refused(layout):
    root, outside = layout
    tifffile.imwrite(outside / "part.ome.tif", np.full((4, 4), 9, np.uint8))
    tifffile.imwrite(root / "main.ome.tif", np.zeros((4, 4), np.uint8),
                     metadata={"axes": "YX"})
    with tifffile.TiffFile(root / "main.ome.tif") as tif:
        ome = tif.ome_metadata
    assert ome
    rel = os.path.relpath(outside / "part.ome.tif", root)
    hostile = ome.replace("<TiffData", f'<TiffData><UUID FileName="{rel}">urn:uuid:1</UUID',
                          1)
    # rewrite the description in place of the OME-XML (same file, new description)
    data = np.zeros((4, 4), np.uint8)
    tifffile.imwrite(root / "main.ome.tif", data, description=hostile, metadata=None)
    with pytest.raises(OutsideRootError, match="companion file"):
        read_image("main.ome.tif", root=root)


# --------------------------------------------------------------------------------------------
# 4. decoded size checked before decoding


def zlib_bomb_tiff(path: Path, shape=(16, 8192, 8192)) -> None:
    """A small zlib TIFF that decodes to prod(shape) bytes of zeros (one page in memory)."""
    page = np.zeros(shape[1:], np.uint8)
    tifffile.imwrite(path, (page for _ in range(shape[0])), shape=shape, dtype=np.uint8,
                     compression="zlib", photometric="minisblack")


@pytest.fixture(scope="module")
def bomb_tiff(tmp_path_factory):
    path = tmp_path_factory.mktemp("bomb") / "bomb.tif"
    zlib_bomb_tiff(path)
    return path


def test_zlib_tiff_bomb_is_refused_before_decoding(bomb_tiff, monkeypatch):
    assert bomb_tiff.stat().st_size < 2_000_000
    monkeypatch.setattr(memory, "available_bytes", lambda: 700 << 20)
    with pytest.raises(OutOfMemory, match=r"decodes to 16x8192x8192 uint8 \(1.0 GiB\)"):
        read_image(bomb_tiff)
    with pytest.raises(OutOfMemory, match="over the limit of 100 MiB"):
        read_image(bomb_tiff, max_bytes=100 << 20)


def test_png_decoded_size_is_checked(tmp_path):
    path = tmp_path / "big.png"
    png_of_zeros(path, 12000, 12000)
    assert path.stat().st_size < 300_000
    with pytest.raises(OutOfMemory, match=r"12000x12000 uint8 \(137 MiB\), and decoding it "
                                          r"needs 275 MiB"):
        read_image(path, max_bytes=100 << 20)


def test_png_decompression_bomb_is_one_line(tmp_path):
    path = tmp_path / "bomb30k.png"
    # only the header is read: the bomb is refused before any pixel is decoded
    _png_header_only(path, 30000, 30000)
    with pytest.raises(InputError, match="more pixels than Pillow will decode") as exc:
        read_image(path)
    assert "\n" not in str(exc.value)


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height, with one row of data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
                     + png_chunk(b"IDAT", zlib.compress(b"\x00" * (width + 1)))
                     + png_chunk(b"IEND", b""))


@pytest.mark.parametrize("ext", [".npy", ".zarr", ".h5", ".mrc"])
def test_decoded_size_checked_for_every_format(tmp_path, ext):
    pytest.importorskip("mrcfile")
    data = np.zeros((4, 64, 64), np.uint16)
    path = save_as(tmp_path / f"v{ext}", data)
    with pytest.raises(OutOfMemory, match=r"4x64x64 uint16 \(32 KiB\)"):
        read_image(path, max_bytes=1000)
    assert read_image(path, max_bytes=1 << 20)[0].shape == data.shape
    # lazy reads stay on disk: not counted
    assert read_image(path, lazy=True, max_bytes=1000)[0].shape == data.shape if ext != ".h5" \
        else True


# --------------------------------------------------------------------------------------------
# 8. corrupt files: one line, never a traceback


def test_truncated_tiff_is_one_line(tmp_path):
    good = tmp_path / "good.tif"
    tifffile.imwrite(good, np.zeros((8, 8), np.uint8))
    (tmp_path / "t.tif").write_bytes(good.read_bytes()[:6])  # struct.error inside tifffile
    with pytest.raises(InputError, match="cannot read .*t.tif.* as TIF") as exc:
        read_image(tmp_path / "t.tif")
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("ext", [".tif", ".png", ".npy", ".h5", ".mrc", ".jpg"])
@pytest.mark.parametrize("cut", [0.3, 0.6, 0.9])
def test_truncated_files_of_every_format_are_input_errors(tmp_path, ext, cut):
    pytest.importorskip("mrcfile")
    data = np.random.default_rng(1).integers(0, 255, (3, 40, 40), dtype=np.uint8)
    path = tmp_path / f"f{ext}"
    if ext == ".tif":
        save_as(path, data, compression="zlib")
    else:
        save_as(path, data[0] if ext in (".png", ".jpg") else data)
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * cut)])
    try:
        arr, _ = read_image(path)
    except InputError as exc:
        assert "\n" not in str(exc)
    else:  # some decoders fill a cut-off tail with zeros: then the shape must still be right
        assert arr.shape[-2:] == (40, 40)


# --------------------------------------------------------------------------------------------
# 7. temporaries of dead writers


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


@pytest.mark.parametrize("ext", [".tif", ".zarr"])
def test_killed_writers_temporaries_are_removed_by_the_next_write(tmp_path, ext):
    host = nio.socket.gethostname()
    target = tmp_path / f"lab{ext}"
    stale = tmp_path / f".lab{ext}.{host}-{dead_pid()}-0123abcd.part{ext}"
    live = tmp_path / f".lab{ext}.{host}-{os.getpid()}-0123abcd.part{ext}"
    other_host = tmp_path / f".lab{ext}.elsewhere-{dead_pid()}-0123abcd.part{ext}"
    for p in (stale, live, other_host):
        p.mkdir() if ext == ".zarr" else p.write_bytes(b"partial")
    write_labels(target, np.ones((4, 4), np.int32))
    assert not stale.exists()
    assert live.exists() and other_host.exists()
    assert read_image(target)[0].sum() == 16


def test_output_moved_aside_by_a_killed_writer_is_put_back(tmp_path):
    host = nio.socket.gethostname()
    old = tmp_path / f".lab.zarr.{host}-{dead_pid()}-0123abcd.old"
    old.mkdir()
    zarr_array(old / "lab.zarr", np.full((4, 4), 5, np.int32))
    removed = remove_stale_temporaries(tmp_path / "lab.zarr")
    assert removed == [old] and not old.exists()
    assert read_image(tmp_path / "lab.zarr")[0].sum() == 80


def test_a_killed_cli_write_leaves_nothing_a_rerun_does_not_clean(tmp_path):
    """kill -9 in the middle of a write, then the same write again: no temporaries left."""
    code = ("import os, signal, numpy as np, tifffile\n"
            "from nbapp.io import write_labels\n"
            "def die(*a, **k):\n"
            "    open(a[0], 'wb').write(b'partial'); os.kill(os.getpid(), signal.SIGKILL)\n"
            "tifffile.imwrite = die\n"
            f"write_labels({str(tmp_path / 'lab.tif')!r}, np.ones((4, 4), np.int32))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == -9
    assert len(os.listdir(tmp_path)) == 1  # the killed writer's temporary
    write_labels(tmp_path / "lab.tif", np.ones((4, 4), np.int32))
    assert os.listdir(tmp_path) == ["lab.tif"]


# --------------------------------------------------------------------------------------------
# 9. writability checked before any work


def test_check_writable(tmp_path):
    check_writable(tmp_path / "out.tif")
    assert os.listdir(tmp_path) == []
    with pytest.raises(InputError, match="does not exist"):
        check_writable(tmp_path / "missing" / "out.tif")


def test_check_writable_refuses_a_read_only_folder(readonly_dir):
    with pytest.raises(InputError, match="refuses new files") as exc:
        check_writable(readonly_dir / "out.tif")
    assert "read-only" in str(exc.value).lower() or "permission" in str(exc.value).lower()


def test_outside_paths_are_refused_before_their_type_is_looked_at(layout):
    root, _ = layout
    with pytest.raises(OutsideRootError):
        read_image("/etc/passwd", root=root)


def strip_bomb_tiff(path: Path, inflated: int = 64 << 20) -> None:
    """A valid 16x16 zlib TIFF whose one strip inflates to ``inflated`` bytes: the header says
    256 bytes, so only a decoder that stops at the strip's size is safe."""
    import io as _io

    buf = _io.BytesIO()
    tifffile.imwrite(buf, np.zeros((16, 16), np.uint8), compression="zlib",
                     photometric="minisblack")
    raw = bytearray(buf.getvalue())
    with tifffile.TiffFile(_io.BytesIO(bytes(raw))) as tif:
        offsets, counts = tif.pages[0].tags["StripOffsets"], tif.pages[0].tags["StripByteCounts"]
        formats = {3: "<H", 4: "<I"}
        spans = [(offsets.valueoffset, formats[offsets.dtype]),
                 (counts.valueoffset, formats[counts.dtype])]
    bomb = zlib.compress(b"\0" * inflated, 9)
    for (where, fmt), value in zip(spans, (len(raw), len(bomb))):
        raw[where:where + struct.calcsize(fmt)] = struct.pack(fmt, value)
    path.write_bytes(bytes(raw) + bomb)


def test_zlib_bomb_inside_a_small_tiff_strip_is_refused(tmp_path):
    strip_bomb_tiff(tmp_path / "strip.tif", 256 << 20)
    assert (tmp_path / "strip.tif").stat().st_size < 300_000
    with pytest.raises(InputError, match="inflates past its 256 bytes"):
        read_image(tmp_path / "strip.tif")
    # in a fresh process, peak memory shows whether the strip was inflated before the refusal
    code = ("import resource\nfrom nbapp.io import read_image\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            f"try:\n    read_image({str(tmp_path / 'strip.tif')!r})\nexcept ValueError:\n    pass\n"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n")
    grown_mb = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                  check=True).stdout)
    assert grown_mb < 64, f"the strip was inflated anyway ({grown_mb} MB)"


@pytest.mark.parametrize("kwargs", [{}, {"predictor": True}, {"tile": (32, 32)}])
def test_zlib_tiffs_still_read_exactly(tmp_path, kwargs):
    data = np.random.default_rng(2).integers(0, 4000, (3, 70, 90), dtype=np.uint16)
    data[:, :30] = 0
    tifffile.imwrite(tmp_path / "z.tif", data, compression="zlib", photometric="minisblack",
                     **kwargs)
    np.testing.assert_array_equal(read_image(tmp_path / "z.tif")[0], data)


def test_nul_in_a_path_is_an_input_error(layout):
    root, _ = layout
    with pytest.raises(InputError, match="NUL character"):
        read_image("a\0b.tif", root=root)


# --- issue 31: what mutmut's survivors showed the tests above did not pin down -----------------

def test_confine_tree_walks_every_depth_and_names_the_link(layout):
    root, outside = layout
    store = root / "deep.zarr"
    (store / "a" / "b").mkdir(parents=True)
    (store / "a" / "b" / "0.0").write_bytes(b"chunk")
    (store / "a" / "b" / "inner").symlink_to(store / "a")  # a link inside the root: fine
    confine_tree(store, root)
    confine_tree(Path("deep.zarr"), root)  # a Path, relative to the root
    (store / "a" / "b" / "evil").symlink_to(outside)
    with pytest.raises(OutsideRootError) as err:
        confine_tree(store, root, "store")
    assert str(err.value) == (f"store {os.fspath(store)!r} links 'a/b/evil' to a place outside "
                              "the data root")
    with pytest.raises(OutsideRootError, match="^zarr store 'deep.zarr' links"):
        confine_tree("deep.zarr", root, "zarr store")
    confine_tree(store, None)  # no root: nothing confined


def test_confine_takes_path_objects_and_names_what_it_refuses(layout):
    from nbapp.confine import DataRoot

    root, _ = layout
    assert confine(Path("x/../a.tif"), root) == Path(os.path.realpath(root)) / "a.tif"
    with pytest.raises(InputError, match=r"^image 'a\\x00b' contains a NUL character$"):
        confine("a\0b", root, "image")
    (root / "v" / "you").mkdir(parents=True)
    (root / "v" / "me").mkdir()
    private = DataRoot(root, private=root / "v", own=root / "v" / "me")
    with pytest.raises(OutsideRootError,
                       match=r"^labels 'the other one' is in another visitor's folder$"):
        confine("v/you/l.tif", private, "labels", shown="the other one")
    with pytest.raises(OutsideRootError, match=r"^path 'v' is the folder of the page's visitors$"):
        confine("v", private)
    assert confine("v/me/l.tif", private).name == "l.tif"
