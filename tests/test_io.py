"""Reading images in every supported format and writing labels atomically (nbapp.io).

Every file is tiny and made in the test; no test needs a network, a GPU or the shared data.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from files import save_as
from nbapp import io as nio
from nbapp.errors import InputError
from nbapp.io import read_image, source_file, split_h5_path, split_zarr_path, write_labels

h5py = pytest.importorskip("h5py", reason="HDF5 tests need h5py (pip install 'nbapp[io]')")
mrcfile = pytest.importorskip("mrcfile", reason="MRC tests need mrcfile (pip install 'nbapp[io]')")
tifffile = pytest.importorskip("tifffile")
zarr = pytest.importorskip("zarr")
Image = pytest.importorskip("PIL.Image")

RNG = np.random.default_rng(0)
IMG8 = RNG.integers(0, 256, (20, 24), dtype=np.uint8)
VOL16 = RNG.integers(0, 4096, (3, 20, 24), dtype=np.uint16)
FLT = RNG.random((20, 24), dtype=np.float32)


def files_in(folder: Path) -> list[str]:
    """Every entry of ``folder``, hidden ones included."""
    return sorted(os.listdir(folder))


# --------------------------------------------------------------------------------------------
# round trips, one per format


@pytest.mark.parametrize("array", [IMG8, VOL16, FLT], ids=["uint8-2d", "uint16-3d", "float32"])
@pytest.mark.parametrize("ext", [".tif", ".tiff", ".npy", ".zarr", ".h5", ".mrc"])
def test_read_round_trip(tmp_path, ext, array):
    path = save_as(tmp_path / f"img{ext}", array)
    out, meta = read_image(path)
    assert isinstance(out, np.ndarray)
    # MRC has no uint8 mode: mrcfile stores uint8 as uint16 (mode 6)
    assert out.dtype == (np.uint16 if ext == ".mrc" and array.dtype == np.uint8 else array.dtype)
    np.testing.assert_array_equal(out, array)
    assert meta["path"] == str(path)
    assert meta["format"] == ext.lstrip(".")


def test_read_accepts_str_and_pathlike(tmp_path):
    np.save(tmp_path / "a.npy", IMG8)
    a, _ = read_image(str(tmp_path / "a.npy"))
    b, _ = read_image(tmp_path / "a.npy")
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("ext", [".npy", ".zarr", ".mrc", ".tif"])
def test_lazy_read_does_not_load(tmp_path, ext):
    path = tmp_path / f"v{ext}"
    if ext == ".npy":
        np.save(path, VOL16)
    elif ext == ".zarr":
        write_labels(path, VOL16)
    elif ext == ".mrc":
        with mrcfile.new(path) as m:
            m.set_data(VOL16)
    else:
        tifffile.imwrite(path, VOL16, photometric="minisblack")  # uncompressed: memory-mappable
    arr, _ = read_image(path, lazy=True)
    if ext == ".zarr":
        assert isinstance(arr, zarr.Array)
    else:
        assert isinstance(arr, np.memmap) or isinstance(arr.base, np.memmap)
    np.testing.assert_array_equal(np.asarray(arr[...]), VOL16)


def test_lazy_compressed_tiff_falls_back_to_reading(tmp_path):
    tifffile.imwrite(tmp_path / "c.tif", VOL16, compression="zlib", photometric="minisblack")
    arr, _ = read_image(tmp_path / "c.tif", lazy=True)
    np.testing.assert_array_equal(arr, VOL16)


# --------------------------------------------------------------------------------------------
# TIFF


@pytest.mark.parametrize("unit,factor", [
    ("um", 1000.0), ("\\u00B5m", 1000.0), ("micron", 1000.0), ("nm", 1.0)])
def test_tiff_voxel_size_from_imagej_metadata(tmp_path, unit, factor):
    tifffile.imwrite(tmp_path / "v.tif", VOL16, imagej=True, resolution=(1 / 0.005, 1 / 0.005),
                     metadata={"unit": unit, "spacing": 0.01, "axes": "ZYX"})
    arr, meta = read_image(tmp_path / "v.tif")
    np.testing.assert_array_equal(arr, VOL16)
    assert meta["voxel_size"] == pytest.approx((0.01 * factor, 0.005 * factor, 0.005 * factor))


def test_tiff_without_calibration_has_no_voxel_size(tmp_path):
    tifffile.imwrite(tmp_path / "v.tif", IMG8)
    assert "voxel_size" not in read_image(tmp_path / "v.tif")[1]


def test_tiff_with_no_pages(tmp_path):
    (tmp_path / "e.tif").write_bytes(b"II*\x00\x00\x00\x00\x00")  # header, first IFD offset 0
    with pytest.raises(InputError, match="has no images"):
        read_image(tmp_path / "e.tif")


# --------------------------------------------------------------------------------------------
# zarr and OME-Zarr


def test_zarr_group_with_one_array(tmp_path):
    g = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    g.create_array("raw", shape=IMG8.shape, dtype=IMG8.dtype)[...] = IMG8
    np.testing.assert_array_equal(read_image(tmp_path / "g.zarr")[0], IMG8)


def test_zarr_group_with_several_arrays_needs_a_path(tmp_path):
    g = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    g.create_array("a", shape=IMG8.shape, dtype=IMG8.dtype)[...] = IMG8
    g.create_array("c", shape=(4, 4), dtype="u1")
    g.create_group("sub").create_array("b", shape=(4, 4), dtype="u2")[...] = 7
    with pytest.raises(InputError, match=r"holds 2 arrays \['a', 'c'\]: give the array's path"):
        read_image(tmp_path / "g.zarr")
    # the suggested STORE.zarr/path form works, also for nested nodes and one-array groups
    np.testing.assert_array_equal(read_image(f"{tmp_path}/g.zarr/a")[0], IMG8)
    np.testing.assert_array_equal(read_image(f"{tmp_path}/g.zarr/sub/b")[0], np.full((4, 4), 7))
    np.testing.assert_array_equal(read_image(f"{tmp_path}/g.zarr/sub")[0], np.full((4, 4), 7))
    with pytest.raises(InputError, match="has no array or group 'nope'"):
        read_image(f"{tmp_path}/g.zarr/nope")


def test_zarr_group_without_arrays(tmp_path):
    zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    with pytest.raises(InputError, match=r"holds 0 arrays \[\]"):
        read_image(tmp_path / "g.zarr")


@pytest.mark.parametrize("content", [None, "not zarr"], ids=["empty-folder", "junk-folder"])
def test_folder_that_is_not_zarr(tmp_path, content):
    folder = tmp_path / "x.zarr"
    folder.mkdir()
    if content:
        (folder / "junk.txt").write_text(content)
    with pytest.raises(InputError, match="cannot open .* as zarr") as exc:
        read_image(folder)
    assert "\n" not in str(exc.value)


def write_ome_zarr(path: Path, levels: list[np.ndarray], scale0: list[float], axes: list[dict],
                   zarr_format: int) -> None:
    """A small OME-Zarr multiscale image: v0.4 (zarr v2, .zattrs) or v0.5 (zarr v3, zarr.json)."""
    g = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    datasets = []
    for i, a in enumerate(levels):
        g.create_array(str(i), shape=a.shape, dtype=a.dtype)[...] = a
        s = [v * (2**i if ax["type"] == "space" else 1) for v, ax in zip(scale0, axes)]
        datasets.append({"path": str(i),
                         "coordinateTransformations": [{"type": "scale", "scale": s}]})
    ms = {"version": "0.4", "axes": axes, "datasets": datasets, "name": "em"}
    if zarr_format == 2:
        g.attrs["multiscales"] = [ms]
    else:
        ms.pop("version")
        g.attrs["ome"] = {"version": "0.5", "multiscales": [ms]}


ZYX_UM = [{"name": n, "type": "space", "unit": "micrometer"} for n in "zyx"]


@pytest.mark.parametrize("zarr_format,meta_file", [(2, ".zattrs"), (3, "zarr.json")])
def test_ome_zarr_reads_level_0_and_voxel_size(tmp_path, zarr_format, meta_file):
    path = tmp_path / "img.ome.zarr"
    write_ome_zarr(path, [VOL16, VOL16[:, ::2, ::2]], [0.03, 0.008, 0.008], ZYX_UM, zarr_format)
    assert (path / meta_file).is_file()
    arr, meta = read_image(path)
    np.testing.assert_array_equal(arr, VOL16)
    assert meta["format"] == "ome-zarr"
    assert meta["voxel_size"] == pytest.approx((30.0, 8.0, 8.0))  # micrometre -> nm
    lazy, _ = read_image(path, lazy=True)
    assert lazy.shape == VOL16.shape


def test_ome_zarr_5d_with_one_time_point_and_channel(tmp_path):
    axes = [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"}] + [
        {"name": n, "type": "space", "unit": "nanometer"} for n in "zyx"]
    write_ome_zarr(tmp_path / "v.zarr", [VOL16[None, None]], [1.0, 1.0, 40.0, 5.0, 5.0], axes, 2)
    arr, meta = read_image(tmp_path / "v.zarr")
    assert arr.shape == VOL16.shape
    assert meta["voxel_size"] == pytest.approx((40.0, 5.0, 5.0))


def test_ome_zarr_without_units_keeps_the_scale(tmp_path):
    write_ome_zarr(tmp_path / "v.zarr", [IMG8], [6.0, 4.0],
                   [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}], 2)
    arr, meta = read_image(tmp_path / "v.zarr")
    np.testing.assert_array_equal(arr, IMG8)
    assert meta["voxel_size"] == (6.0, 4.0)


def test_ome_zarr_with_malformed_multiscales(tmp_path):
    g = zarr.open_group(str(tmp_path / "v.zarr"), mode="w", zarr_format=2)
    g.create_array("0", shape=(4, 4), dtype="u1")
    g.attrs["multiscales"] = [{"datasets": [{"path": "missing"}]}]
    with pytest.raises(InputError, match="malformed multiscales"):
        read_image(tmp_path / "v.zarr")


# --------------------------------------------------------------------------------------------
# zarr chunks: every read decodes whole chunks, so a chunk's decoded size is checked first


BOMB_SHAPE = (96, 4096, 4096)


def one_chunk_zarr(path: Path, shape=BOMB_SHAPE) -> Path:
    """A zarr v2 store of zeros in ONE zlib chunk: about 1.5 MB on disk, prod(shape) bytes
    decoded. The chunk is deflated 16 MiB at a time (a full flush makes every piece the same
    bytes), so making it never holds the decoded chunk."""
    import struct
    import zlib

    import numcodecs

    zarr.create_array(str(path), shape=shape, chunks=shape, dtype="uint8", fill_value=1,
                      zarr_format=2, compressors=numcodecs.Zlib(level=9))
    n = int(np.prod(shape))
    piece = 16 << 20
    assert n % piece == 0
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = deflate.compress(bytes(piece)) + deflate.flush(zlib.Z_FULL_FLUSH)
    adler = ((n % 65521) << 16) | 1  # adler32 of n zero bytes
    data = b"\x78\xda" + body * (n // piece) + deflate.flush() + struct.pack(">I", adler)
    (path / ".".join("0" * len(shape))).write_bytes(data)
    return path


def test_zarr_chunk_bomb_is_refused_before_reading(tmp_path, monkeypatch):
    """A 1.5 MB store of 96 x 4096 x 4096 in one chunk passed the checks (only the slice was
    counted) and every slice read decoded 1.5 GiB (peak 0.37 -> 2.19 GB, 12 s a slice)."""
    from nbapp import memory
    from nbapp.memory import OutOfMemory

    path = one_chunk_zarr(tmp_path / "bomb.zarr")
    assert sum(f.stat().st_size for f in path.iterdir()) < 2_000_000
    import zlib  # a real chunk of zeros (not the fill value 1), its start inflated only

    assert zlib.decompressobj().decompress((path / "0.0.0").read_bytes(), 4096) == bytes(4096)
    monkeypatch.setattr(zarr.Array, "__getitem__", _refuse_reading)
    chunk = r"zarr bomb.zarr is stored in chunks of 96 x 4096 x 4096 uint8 \(1.5 GiB decoded each\)"
    fix = "; rechunk the store to smaller chunks, e.g. 1 x 1024 x 1024$"
    with pytest.raises(OutOfMemory, match=rf"^out of memory: {chunk}, over the 128 MiB a chunk "
                                          r"may take \(every read of a slice or block decodes "
                                          rf"each chunk it touches whole\){fix}") as exc:
        read_image(path, lazy=True)
    assert "\n" not in str(exc.value)
    # a whole read decodes the chunk beside the array: both must fit
    monkeypatch.setattr(memory, "available_bytes", lambda: 4 << 30)
    with pytest.raises(OutOfMemory, match=rf"{chunk}, over the 512 MiB a chunk may take \("
                                          r"beside its 1.5 GiB of data, within half the memory "
                                          rf"this process has left, 2.0 GiB\){fix}"):
        read_image(path)
    with pytest.raises(OutOfMemory, match=r"over the 1.0 GiB a chunk may take \(beside its "
                                          r"1.5 GiB of data, within the limit for one image, "
                                          r"2.5 GiB\)"):
        read_image(path, max_bytes=int(2.5 * (1 << 30)))


def _refuse_reading(self, *args, **kwargs):
    raise AssertionError("a zarr chunk was read: the check must come first")


def test_ome_zarr_and_nodes_have_their_chunks_checked(tmp_path, monkeypatch):
    """OME-Zarr level 0 (zarr v3) and a node inside a store, from their metadata alone."""
    from nbapp.memory import OutOfMemory

    monkeypatch.setattr(zarr.Array, "__getitem__", _refuse_reading)
    g = zarr.open_group(str(tmp_path / "ome.zarr"), mode="w", zarr_format=3)
    g.create_array("0", shape=(1, 1, *BOMB_SHAPE), chunks=(1, 1, *BOMB_SHAPE), dtype="uint16")
    axes = [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"}] + ZYX_UM
    g.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": axes, "datasets": [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0] * 5}]}]}]}
    with pytest.raises(OutOfMemory, match=r"chunks of 1 x 1 x 96 x 4096 x 4096 uint16 \(3.0 GiB "
                                          r"decoded each\).*e.g. 1 x 1 x 1 x 1024 x 1024$"):
        read_image(tmp_path / "ome.zarr", lazy=True)
    g.create_array("raw", shape=(4096, 8192), chunks=(4096, 8192), dtype="float64")
    with pytest.raises(OutOfMemory, match=r"chunks of 4096 x 8192 float64 \(256 MiB.*e.g. "
                                          r"1024 x 1024$"):
        read_image(f"{tmp_path}/ome.zarr/raw", lazy=True, max_bytes=10 << 30)


def test_zarr_chunk_budget_of_lazy_and_whole_reads(tmp_path, monkeypatch):
    from nbapp import memory
    from nbapp.memory import OutOfMemory

    data = np.arange(8 * 512 * 512, dtype=np.uint32).reshape(8, 512, 512) % 251
    whole = zarr.create_array(str(tmp_path / "one.zarr"), shape=data.shape, chunks=data.shape,
                              dtype="uint8")
    whole[...] = data
    planes = zarr.create_array(str(tmp_path / "planes.zarr"), shape=data.shape,
                               chunks=(1, 512, 512), dtype="uint8")
    planes[...] = data
    assert np.array_equal(read_image(tmp_path / "one.zarr", lazy=True)[0][3], data[3])
    monkeypatch.setattr(nio, "MAX_CHUNK_BYTES", 1 << 20)
    with pytest.raises(OutOfMemory, match=r"chunks of 8 x 512 x 512 uint8 \(2.0 MiB decoded "
                                          r"each\), over the 1.0 MiB a chunk may take"):
        read_image(tmp_path / "one.zarr", lazy=True)
    assert np.array_equal(read_image(tmp_path / "planes.zarr", lazy=True)[0][5], data[5])
    # a lazy read under the cap is left to the job that reads it when memory is short (its
    # own checks say what needs less: not "rechunk" a store of small chunks)
    monkeypatch.setattr(nio, "MAX_CHUNK_BYTES", 128 << 20)
    monkeypatch.setattr(memory, "available_bytes", lambda: 1 << 20)
    assert read_image(tmp_path / "one.zarr", lazy=True)[0].shape == data.shape
    # a whole read: the 2 MiB array and one 256 KiB chunk beside it
    assert np.array_equal(read_image(tmp_path / "planes.zarr", max_bytes=(2 << 20) + (256 << 10))
                          [0], data)
    with pytest.raises(OutOfMemory, match=r"over the 0 B a chunk may take \(beside its 2.0 MiB "
                                          r"of data, within the limit for one image, 2.0 MiB\)"):
        read_image(tmp_path / "planes.zarr", max_bytes=2 << 20)


def test_a_large_shard_of_small_chunks_is_read_a_chunk_at_a_time(tmp_path):
    """zarr v3 shards are not decoded whole (their index says where each inner chunk is): a
    96 x 4096 x 4096 shard of 1 x 1024 x 1024 chunks is accepted and a slice reads fast."""
    arr = zarr.create_array(str(tmp_path / "s.zarr"), shape=BOMB_SHAPE, chunks=(1, 1024, 1024),
                            shards=BOMB_SHAPE, dtype="uint8", fill_value=1)
    arr[2:4] = 7
    lazy = read_image(tmp_path / "s.zarr", lazy=True)[0]
    assert lazy[3].shape == (4096, 4096) and (lazy[3] == 7).all() and (lazy[5] == 1).all()


def test_cli_refuses_a_zarr_chunk_bomb_in_one_line(tmp_path, capsys, monkeypatch):
    from nbapp.cli import main

    path = one_chunk_zarr(tmp_path / "bomb.zarr")
    monkeypatch.setattr(zarr.Array, "__getitem__", _refuse_reading)  # (it ran for minutes)
    rc = main(["segment", str(path), "-o", str(tmp_path / "out.zarr"), "--mode", "3d"])
    err = capsys.readouterr().err
    assert rc == 1 and len(err.splitlines()) == 1, err
    assert err.startswith("nbapp: error: out of memory: zarr bomb.zarr is stored in chunks of "
                          "96 x 4096 x 4096 uint8 (1.5 GiB decoded each)")
    assert "rechunk the store" in err and not (tmp_path / "out.zarr").exists()


# --------------------------------------------------------------------------------------------
# HDF5


def test_h5_with_one_dataset_needs_no_name(tmp_path):
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["volumes/raw"] = VOL16
        f["volumes/raw"].attrs["element_size_um"] = [0.04, 0.005, 0.005]
    for spec in ("a.h5", "a.h5:volumes/raw", "a.h5:/volumes/raw"):
        arr, meta = read_image(f"{tmp_path}/{spec}")
        np.testing.assert_array_equal(arr, VOL16)
        assert meta["voxel_size"] == pytest.approx((40.0, 5.0, 5.0))
        assert meta["dataset"].strip("/") == "volumes/raw"


def test_h5_with_several_datasets_needs_a_name(tmp_path):
    with h5py.File(tmp_path / "a.hdf5", "w") as f:
        f["raw"] = IMG8
        f["labels"] = IMG8.astype(np.int32)
    with pytest.raises(InputError,
                       match=r"holds datasets \['labels', 'raw'\]: name one as .*a.hdf5:labels"):
        read_image(tmp_path / "a.hdf5")
    np.testing.assert_array_equal(read_image(f"{tmp_path}/a.hdf5:raw")[0], IMG8)
    with pytest.raises(InputError, match=r"has no dataset 'nope'; it holds \['labels', 'raw'\]"):
        read_image(f"{tmp_path}/a.hdf5:nope")


def test_h5_without_datasets(tmp_path):
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f.create_group("empty")
    with pytest.raises(InputError, match="holds no datasets"):
        read_image(tmp_path / "a.h5")


# --------------------------------------------------------------------------------------------
# MRC


def test_mrc_voxel_size_angstrom_to_nm(tmp_path):
    with mrcfile.new(tmp_path / "v.mrc") as m:
        m.set_data(VOL16.astype(np.float32))
        m.voxel_size = (50.0, 60.0, 300.0)  # mrcfile order (x, y, z), in Å
    arr, meta = read_image(tmp_path / "v.mrc")
    assert arr.shape == VOL16.shape
    assert meta["voxel_size"] == pytest.approx((30.0, 6.0, 5.0))  # (z, y, x) in nm


@pytest.mark.parametrize("ext", [".map", ".rec"])
def test_mrc_other_extensions_without_voxel_size(tmp_path, ext):
    with mrcfile.new(tmp_path / "v.mrc") as m:
        m.set_data(IMG8.astype(np.int16))
    os.replace(tmp_path / "v.mrc", tmp_path / f"v{ext}")
    arr, meta = read_image(tmp_path / f"v{ext}")
    np.testing.assert_array_equal(arr, IMG8)
    assert "voxel_size" not in meta


@pytest.mark.parametrize("lazy", [False, True])
def test_mrc_junk_is_one_line_error_without_warnings(tmp_path, lazy):
    # filterwarnings=error: a warning leaking from mrcfile would fail this test
    (tmp_path / "j.mrc").write_bytes(np.random.default_rng(1).bytes(4000))
    with pytest.raises(InputError) as exc:
        read_image(tmp_path / "j.mrc", lazy=lazy)
    assert "j.mrc" in str(exc.value) and "\n" not in str(exc.value)


# --------------------------------------------------------------------------------------------
# PNG / JPEG


def test_png_grey_and_16_bit(tmp_path):
    Image.fromarray(IMG8).save(tmp_path / "g.png")
    np.testing.assert_array_equal(read_image(tmp_path / "g.png")[0], IMG8)
    Image.fromarray(VOL16[0]).save(tmp_path / "g16.png")
    arr, _ = read_image(tmp_path / "g16.png")
    np.testing.assert_array_equal(arr, VOL16[0])


def test_png_rgb_is_converted_to_grey(tmp_path):
    rgb = np.zeros((20, 24, 3), np.uint8)
    rgb[..., 0] = 255  # pure red -> ITU-R 601 luma 0.299 * 255
    Image.fromarray(rgb).save(tmp_path / "c.png")
    arr, meta = read_image(tmp_path / "c.png")
    assert arr.shape == (20, 24) and arr.dtype == np.uint8
    assert abs(int(arr[0, 0]) - 76) <= 1
    assert meta["converted"] == "RGB converted to grey"


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "P"])
def test_png_grey_stored_as_colour_is_exact(tmp_path, mode):
    Image.fromarray(IMG8).convert(mode).save(tmp_path / "g.png")
    arr, meta = read_image(tmp_path / "g.png")
    np.testing.assert_array_equal(arr, IMG8)
    assert "converted" not in meta


def test_jpeg(tmp_path):
    smooth = np.add.outer(np.arange(32), np.arange(32)).astype(np.uint8) * 3
    Image.fromarray(smooth).save(tmp_path / "s.jpg", quality=95)
    arr, _ = read_image(tmp_path / "s.jpg")
    assert arr.shape == smooth.shape
    assert np.abs(arr.astype(int) - smooth).max() <= 8


# --------------------------------------------------------------------------------------------
# errors common to every format


@pytest.mark.parametrize("ext", [".tif", ".npy", ".h5", ".png", ".jpg", ".mrc"])
@pytest.mark.parametrize("content", [b"", b"junk" * 64], ids=["empty", "junk"])
def test_corrupt_file_is_one_line_input_error(tmp_path, ext, content):
    path = tmp_path / f"bad{ext}"
    path.write_bytes(content)
    with pytest.raises(InputError) as exc:
        read_image(path)
    msg = str(exc.value)
    assert "bad" in msg and "\n" not in msg


def test_truncated_npy(tmp_path):
    np.save(tmp_path / "t.npy", VOL16)
    data = (tmp_path / "t.npy").read_bytes()
    (tmp_path / "t.npy").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cannot read .*t.npy.* as NPY"):
        read_image(tmp_path / "t.npy")


def test_pickled_npy_is_refused(tmp_path):
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="as NPY"):
        read_image(tmp_path / "o.npy")


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_image(tmp_path / "nope.tif")
    with pytest.raises(InputError, match="does not exist"):
        read_image(f"{tmp_path}/nope.h5:raw")


@pytest.mark.parametrize("name", ["image.bmp", "image", "volume.n5"])
def test_unknown_extension(tmp_path, name):
    (tmp_path / name).write_bytes(b"x")
    with pytest.raises(InputError, match="unknown file type"):
        read_image(tmp_path / name)


def test_directory_named_like_a_file(tmp_path):
    (tmp_path / "d.tif").mkdir()
    with pytest.raises(InputError, match="cannot read"):
        read_image(tmp_path / "d.tif")


def test_split_paths():
    assert split_h5_path("C.HDF5:raw") == ("C.HDF5", "raw")
    assert split_h5_path("a.h5:") == ("a.h5", None)
    assert split_zarr_path("a.zarr") == ("a.zarr", None)
    assert split_zarr_path("a.zarr/b/c/") == ("a.zarr", "b/c")
    assert source_file(Path("x.tif")) == "x.tif"
    assert source_file("d/v.ome.zarr/0") == "d/v.ome.zarr"


# --------------------------------------------------------------------------------------------
# write_labels


LABELS = np.array([[0, 1, 1, 0], [2, 2, 0, 10001], [0, 0, 0, 10001]], np.int32)


@pytest.mark.parametrize("ext", [".tif", ".tiff", ".TIF", ".zarr"])
@pytest.mark.parametrize("labels", [LABELS, np.stack([LABELS, LABELS * 2, LABELS * 3])],
                         ids=["2d", "3d"])
def test_write_labels_round_trip(tmp_path, ext, labels):
    out = write_labels(tmp_path / f"lab{ext}", labels)
    assert out == tmp_path / f"lab{ext}"
    back, _ = read_image(out)
    assert back.dtype == np.int32
    np.testing.assert_array_equal(back, labels)
    assert files_in(tmp_path) == [f"lab{ext}"]  # no temporary file left


def test_write_labels_zarr_chunks(tmp_path):
    vol = np.zeros((3, 40, 30), np.int32)
    write_labels(tmp_path / "a.zarr", vol)
    assert zarr.open(str(tmp_path / "a.zarr"), mode="r").chunks == (1, 40, 30)
    write_labels(tmp_path / "b.zarr", vol, chunks=(3, 8, 8))
    assert zarr.open(str(tmp_path / "b.zarr"), mode="r").chunks == (3, 8, 8)


def test_write_labels_in_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_labels("here.tif", LABELS)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "here.tif"), LABELS)


@pytest.mark.parametrize("ext", [".tif", ".zarr"])
def test_write_labels_replaces_existing_target(tmp_path, ext):
    target = tmp_path / f"lab{ext}"
    write_labels(target, LABELS)
    write_labels(target, LABELS[::-1] * 3)
    np.testing.assert_array_equal(read_image(target)[0], LABELS[::-1] * 3)
    assert files_in(tmp_path) == [f"lab{ext}"]


def test_failed_tiff_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "lab.tif"
    write_labels(target, LABELS)

    def broken(path, *args, **kwargs):
        Path(path).write_bytes(b"half a file")  # like a write cut off by a full disk
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tifffile, "imwrite", broken)
    with pytest.raises(InputError, match="cannot write .*lab.tif.*No space left on device"):
        write_labels(target, LABELS * 5)
    np.testing.assert_array_equal(read_image(target)[0], LABELS)
    assert files_in(tmp_path) == ["lab.tif"]


def test_interrupted_write_leaves_no_temp(tmp_path, monkeypatch):
    def interrupted(path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(tifffile, "imwrite", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_labels(tmp_path / "lab.tif", LABELS)
    assert files_in(tmp_path) == []


def test_failed_zarr_write_keeps_old_store_and_leaves_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "lab.zarr"
    write_labels(target, LABELS)
    real_open = zarr.open

    def broken(store, **kwargs):
        real_open(store, **kwargs)
        (Path(store) / "c").mkdir(exist_ok=True)  # some chunks written, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(zarr, "open", broken)
    with pytest.raises(InputError, match="No space left"):
        write_labels(target, LABELS * 7)
    monkeypatch.undo()
    np.testing.assert_array_equal(read_image(target)[0], LABELS)
    assert files_in(tmp_path) == ["lab.zarr"]


def test_failed_zarr_rename_restores_old_store(tmp_path, monkeypatch):
    target = tmp_path / "lab.zarr"
    write_labels(target, LABELS)
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst) == target and ".part" in Path(src).name:
            raise PermissionError(13, "Permission denied")
        return real_replace(src, dst)

    monkeypatch.setattr(nio.os, "replace", replace)
    with pytest.raises(InputError, match="Permission denied"):
        write_labels(target, LABELS * 7)
    monkeypatch.undo()
    np.testing.assert_array_equal(read_image(target)[0], LABELS)
    assert files_in(tmp_path) == ["lab.zarr"]


@pytest.mark.parametrize("name", ["lab.png", "lab.npy", "lab"])
def test_write_labels_unknown_extension(tmp_path, name):
    with pytest.raises(InputError, match="use one of .tif, .tiff, .zarr"):
        write_labels(tmp_path / name, LABELS)
    assert files_in(tmp_path) == []


def test_write_labels_missing_folder(tmp_path):
    with pytest.raises(InputError, match="output folder .* does not exist"):
        write_labels(tmp_path / "nope" / "lab.tif", LABELS)
    assert files_in(tmp_path) == []


def test_write_labels_over_a_folder(tmp_path):
    (tmp_path / "lab.tif").mkdir()
    with pytest.raises(InputError, match="is an existing folder"):
        write_labels(tmp_path / "lab.tif", LABELS)
    assert files_in(tmp_path) == ["lab.tif"]


@settings(max_examples=25, deadline=None)
@given(labels=arrays(np.int32, st.tuples(st.integers(1, 9), st.integers(1, 9)),
                     elements=st.integers(0, 2**31 - 1)),
       ext=st.sampled_from([".tif", ".zarr"]))
def test_write_read_is_identity(labels, ext):
    with tempfile.TemporaryDirectory() as folder:
        out = write_labels(Path(folder) / f"l{ext}", labels)
        back, _ = read_image(out)
        np.testing.assert_array_equal(back, labels)
        assert back.dtype == labels.dtype
