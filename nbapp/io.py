"""Reading images / volumes and writing labels: TIFF, NumPy, zarr / OME-Zarr, MRC, HDF5, PNG.

Readers return the array (lazily where the format allows it) and a metadata dict with the voxel
size when the file gives one. Writers go to a temporary name beside the target and rename it
when complete, so a failed or interrupted write never leaves a half-written output.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import struct
import tempfile
import uuid
import warnings
import zlib
from pathlib import Path

import numpy as np

from nbapp.confine import confine, confine_tree
from nbapp.errors import InputError, NbappError
from nbapp.memory import OutOfMemory, check_fits, format_bytes

__all__ = ["read_image", "write_labels", "READ_FORMATS", "WRITE_FORMATS", "split_h5_path",
           "split_zarr_path", "source_file", "remove_stale_temporaries", "check_writable",
           "stack_paths"]

READ_FORMATS = (".tif", ".tiff", ".npy", ".zarr", ".mrc", ".map", ".rec", ".h5", ".hdf5",
                ".png", ".jpg", ".jpeg")
WRITE_FORMATS = (".tif", ".tiff", ".zarr")


def split_h5_path(path: str) -> tuple[str, str | None]:
    """Split ``FILE.h5:dataset`` into the file and the dataset name.

    >>> split_h5_path("vol.h5:/raw/em")
    ('vol.h5', '/raw/em')
    >>> split_h5_path("vol.h5")
    ('vol.h5', None)
    """
    for ext in (".h5:", ".hdf5:"):
        i = path.lower().find(ext)
        if i >= 0:
            cut = i + len(ext) - 1
            return path[:cut], path[cut + 1 :] or None
    return path, None


def split_zarr_path(path: str) -> tuple[str, str | None]:
    """Split ``STORE.zarr/inner/path`` into the store and the path of a node inside it.

    >>> split_zarr_path("vol.zarr/labels/0")
    ('vol.zarr', 'labels/0')
    >>> split_zarr_path("vol.zarr/")
    ('vol.zarr', None)
    >>> split_zarr_path("runs.zarr/img.tif")  # a file in a folder named .zarr
    ('runs.zarr/img.tif', None)
    """
    i = path.lower().find(".zarr/")
    if i < 0 or _suffix(path) in READ_FORMATS and _suffix(path) != ".zarr":
        return path, None
    cut = i + len(".zarr")
    return path[:cut], path[cut + 1 :].strip("/") or None


def source_file(path: str | os.PathLike) -> str:
    """The file or folder that ``path`` reads from (without an HDF5 dataset or zarr node).

    >>> source_file("vol.h5:raw"), source_file("vol.zarr/0"), source_file("a.tif")
    ('vol.h5', 'vol.zarr', 'a.tif')
    """
    spath = os.fspath(path)
    file, _ = split_h5_path(spath)
    return split_zarr_path(file)[0]


def _suffix(path: str) -> str:
    return Path(path.rstrip("/")).suffix.lower()


def read_image(path: str | os.PathLike, lazy: bool = False, root: str | os.PathLike | None = None,
               max_bytes: int | None = None) -> tuple[np.ndarray, dict]:
    """Read an image, stack or volume; return ``(array, meta)``.

    Parameters
    ----------
    path : str
        ``.tif``/``.tiff``, ``.npy``, ``.zarr`` (an array, or OME-Zarr: level 0; a node inside
        a store as ``STORE.zarr/path/to/node``), ``.mrc``, ``FILE.h5:dataset`` (the dataset may
        be omitted when the file holds only one), ``.png``/``.jpg`` (RGB is converted to grey).
    lazy : bool
        Return a memory-mapped or zarr array where possible instead of loading into memory.
    root : path, optional
        Confine reading to this folder (what the app passes: its data root). Relative paths
        are taken from it, and everything the read would open must resolve inside it: the
        file, every symbolic link of a zarr store, HDF5 external storage and virtual datasets
        (refused), OME-TIFF companion files.
    max_bytes : int, optional
        Refuse a file whose decoded array (shape x item size, known from its header before
        anything is decoded) is larger. Default: half the memory this process has left
        (:func:`nbapp.memory.available_bytes`; the rest is for working on what is read). Lazy
        reads that stay on disk are not counted.

    Returns
    -------
    array : (H, W) or (Z, Y, X) array
    meta : dict
        ``path``, ``format`` and, when known, ``voxel_size`` (Z, Y, X) in nm.

    Raises
    ------
    InputError
        The file is missing, of an unknown type, corrupt, does not say which array to read,
        or lies (or refers to data) outside ``root``.
    nbapp.memory.OutOfMemory
        The decoded array would not fit (``max_bytes`` or the memory left).
    """
    spath = os.fspath(path)
    file, dataset = split_h5_path(spath)
    file, node = split_zarr_path(file)
    ext = _suffix(file)
    if root is not None:  # first: a path outside the root is refused whatever it names
        file = str(confine(file, root, "input"))
        if node:  # a path inside the store: what it resolves to must stay in the root too
            confine(os.path.join(file, node), root, "zarr node", shown=node)
    if ext not in READ_FORMATS:
        raise InputError(f"cannot read {spath!r}: unknown file type {ext or '(none)'}; "
                         f"supported: {', '.join(READ_FORMATS)}")
    if not os.path.exists(file):
        raise InputError(f"input {file!r} does not exist")
    meta: dict = {"path": spath, "format": ext.lstrip(".")}
    limit = _Limit(spath, max_bytes)
    try:
        with warnings.catch_warnings():
            # Pillow warns above 89 M pixels; the decoded size is checked here instead
            warnings.simplefilter("ignore", getattr(_pil_image(), "DecompressionBombWarning",
                                                    Warning))
            if ext in (".tif", ".tiff"):
                arr = _read_tiff(file, lazy, meta, limit, root)
            elif ext == ".npy":
                arr = _read_npy(file, lazy, limit)
            elif ext == ".zarr":
                confine_tree(file, root, "zarr store")
                arr = _read_zarr(file, node, lazy, meta, limit)
            elif ext in (".mrc", ".map", ".rec"):
                arr = _read_mrc(file, lazy, meta, limit)
            elif ext in (".h5", ".hdf5"):
                arr = _read_h5(file, dataset, lazy, meta, limit, root)
            else:
                arr = _read_picture(file, meta, limit)
    except NbappError:
        raise
    except _DECODER_ERRORS as exc:  # corrupt, truncated or hostile files: one clear line
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot read {spath!r} as {ext.lstrip('.').upper()}: {msg}") from None
    return arr, meta


#: What decoders raise on corrupt, truncated or hostile files (tifffile's struct.error on a
#: truncated header, zlib.error on a damaged stream, h5py's OSError and KeyError, ...).
_DECODER_ERRORS = (OSError, ValueError, KeyError, TypeError, EOFError, IndexError, RuntimeError,
                   struct.error, zlib.error)


def _pil_image():
    from PIL import Image

    return Image


#: Share of the memory left that one in-memory read may take: the rest is for working on it.
READ_FRACTION = 0.5


class _Limit:
    """The decoded-size check of one read: ``limit(shape, dtype)`` before any decoding."""

    def __init__(self, path: str, max_bytes: int | None):
        self.path, self.max_bytes = path, max_bytes

    def __call__(self, shape, dtype, factor: float = 1.0) -> None:
        nbytes = float(np.prod([int(s) for s in shape], dtype=float)) * np.dtype(dtype).itemsize
        need = nbytes * factor
        what = (f"{Path(self.path).name} decodes to {'x'.join(str(int(s)) for s in shape)} "
                f"{np.dtype(dtype)} ({format_bytes(nbytes)}), "
                + ("and decoding it" if factor > 1 else "which"))
        if self.max_bytes is not None:
            if need > self.max_bytes:
                raise OutOfMemory(f"out of memory: {what} needs {format_bytes(need)}, over the "
                                  f"limit of {format_bytes(self.max_bytes)} for one image; read "
                                  "a smaller crop, or use a lazy format (zarr, uncompressed "
                                  "TIFF) for large volumes")
            return
        check_fits(need, what, fraction=READ_FRACTION,
                   hint="read a smaller crop, or use a lazy format (zarr, uncompressed TIFF) for "
                        "large volumes")


def _tiff_voxel_size(tif) -> tuple | None:
    """(Z, Y, X) voxel size in nm from ImageJ metadata, if the file has it."""
    ij = tif.imagej_metadata or {}
    unit = str(ij.get("unit", "")).replace("\\u00B5", "u").replace("\u00b5", "u")
    scale = {"nm": 1.0, "micron": 1000.0, "um": 1000.0, "microns": 1000.0}.get(unit)
    tag = tif.pages.first.tags.get("XResolution")
    if scale is None or tag is None:
        return None
    try:
        num, den = tag.value
        xy = scale * den / num
        z = scale * float(ij.get("spacing", xy / scale))
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return (z, xy, xy)


def _bounded_zlib(data, out=None):
    """Deflate that stops at the segment's size: tifffile's own fallback decoder ignores the
    expected size, so one small strip could inflate to gigabytes (a zlib bomb hidden in a
    valid header)."""
    if not isinstance(out, int):
        return zlib.decompress(data)
    inflater = zlib.decompressobj()
    result = inflater.decompress(data, out)
    if inflater.unconsumed_tail:  # input left over once the segment is full
        raise ValueError(f"a compressed strip inflates past its {out} bytes (a decompression "
                         "bomb?)")
    return result


def _bound_tiff_decoders(tifffile) -> None:
    """Use :func:`_bounded_zlib` for deflate TIFFs where tifffile would use its unbounded
    fallback (imagecodecs, when installed, honours the size itself)."""
    codecs = getattr(tifffile.TIFF.DECOMPRESSORS, "_codecs", None)
    if codecs is None:
        return
    for key in (8, 32946, 50013):  # deflate, old-style deflate, PixTIFF deflate
        try:
            current = tifffile.TIFF.DECOMPRESSORS[key]
        except (KeyError, ImportError, NotImplementedError):
            continue
        # tifffile's fallback lives in tifffile._imagecodecs; the imagecodecs package's own
        if str(getattr(current, "__module__", "")).split(".")[0] != "imagecodecs":
            codecs[key] = _bounded_zlib


def _read_tiff(file: str, lazy: bool, meta: dict, limit: _Limit, root) -> np.ndarray:
    import tifffile

    _bound_tiff_decoders(tifffile)
    with tifffile.TiffFile(file) as tif:
        if not tif.pages:
            raise InputError(f"TIFF {file!r} has no images")
        if root is not None and tif.is_ome:
            _confine_ome_files(tif, file, root)
        vs = _tiff_voxel_size(tif)
        if vs:
            meta["voxel_size"] = vs
        if lazy:
            try:
                return tifffile.memmap(file, mode="r")
            except ValueError:  # compressed or tiled: read through a zarr view of the pages
                return LazyView.of_tiff(file)
        series = tif.series[0]
        limit(series.shape, series.dtype)
        return tif.asarray()


def _confine_ome_files(tif, file: str, root) -> None:
    """An OME-TIFF names companion files (``UUID FileName``) that tifffile opens beside it:
    each must stay inside the root."""
    xml = tif.ome_metadata or ""
    folder = os.path.dirname(file)
    for name in set(re.findall(r"FileName\s*=\s*[\"']([^\"']+)[\"']", xml)):
        confine(os.path.join(folder, name), root, f"OME-TIFF {Path(file).name}: companion file")


def _read_npy(file: str, lazy: bool, limit: _Limit) -> np.ndarray:
    if lazy:
        return np.load(file, mmap_mode="r", allow_pickle=False)
    fmt = np.lib.format
    with open(file, "rb") as f:
        version = fmt.read_magic(f)
        read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, _, dtype = read_header(f)
    limit(shape, dtype)
    return np.load(file, allow_pickle=False)


#: OME-NGFF length units -> nanometres.
_UNITS_NM = {"angstrom": 0.1, "nanometer": 1.0, "micrometer": 1000.0, "millimeter": 1e6,
             "centimeter": 1e7, "meter": 1e9}


def _ome_level0(group, file: str, meta: dict):
    """Level 0 of an OME-Zarr multiscale group, with its voxel size in nm when known."""
    attrs = dict(group.attrs)
    ome = attrs.get("ome", attrs)
    multiscales = ome.get("multiscales") if isinstance(ome, dict) else None
    if not multiscales:
        return None
    try:
        ms = multiscales[0]
        ds = ms["datasets"][0]
        arr = group[ds["path"]]
    except (KeyError, IndexError, TypeError) as exc:
        raise InputError(f"OME-Zarr {file!r} has malformed multiscales metadata "
                         f"(no level 0: {exc!s})") from None
    meta["format"] = "ome-zarr"
    axes = ms.get("axes") or []
    scale = None
    for t in ds.get("coordinateTransformations", []):
        if t.get("type") == "scale":
            scale = [float(v) for v in t["scale"]]
    if scale is not None:
        if len(axes) == len(scale) and all(isinstance(a, dict) for a in axes):
            spatial = [(s, a.get("unit")) for s, a in zip(scale, axes) if a.get("type") == "space"]
        else:
            spatial = [(s, None) for s in scale[-3:]]
        meta["voxel_size"] = tuple(s * _UNITS_NM.get(u, 1.0) for s, u in spatial)
    return arr


def _read_zarr(file: str, node: str | None, lazy: bool, meta: dict, limit: _Limit) -> np.ndarray:
    import zarr

    try:
        root = zarr.open(file, mode="r")
    except Exception as exc:  # zarr raises many types for non-zarr folders
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot open {file!r} as zarr: {msg}") from None
    where = file
    if node:
        where = f"{file}/{node}"
        try:
            root = root[node]
        except (KeyError, TypeError):
            raise InputError(f"zarr store {file!r} has no array or group {node!r}") from None
    if hasattr(root, "shape") and hasattr(root, "dtype"):
        arr = root
    else:
        arr = _ome_level0(root, where, meta)
        if arr is None:
            names = sorted(k for k, _ in root.arrays())
            if len(names) != 1:
                raise InputError(
                    f"zarr group {where!r} holds {len(names)} arrays {names}: give the array's "
                    f"path, e.g. {where}/{names[0] if names else 'name'}")
            arr = root[names[0]]
    if not lazy:
        limit(arr.shape, arr.dtype)
    _check_zarr_chunks(arr, where, lazy, limit.max_bytes)
    if lazy:
        return LazyView.squeezed(arr) if meta["format"] == "ome-zarr" else arr
    data = np.asarray(arr[...])
    if meta["format"] == "ome-zarr":  # (t, c, z, y, x) files with one time point and channel
        while data.ndim > 3 and data.shape[0] == 1:
            data = data[0]
    return data


#: Largest decoded chunk a lazy zarr read accepts. Every read of a slice or a block decodes
#: each chunk it touches whole (zarr decodes several at once): a 49 KB store of 96 x 4096 x
#: 4096 in one chunk made every slice read decode 1.5 GiB (peak 0.37 -> 2.19 GB, 12 s a
#: slice). 128 MiB admits the usual layouts (1 x 1024 x 1024 planes, 64^3 ... 512^3 uint8
#: cubes). A zarr v3 shard is not decoded whole (its index says where each inner chunk is:
#: a slice of a 96 x 4096 x 4096 shard of 1 x 1024 x 1024 chunks read in 0.08 s, peak
#: +35 MB), so the inner chunk is what counts.
MAX_CHUNK_BYTES = 128 << 20


def _check_zarr_chunks(arr, where: str, lazy: bool, max_bytes: int | None) -> None:
    """Refuse a zarr array whose chunk decodes to more than a read may take, from its
    metadata, before any chunk is read. A lazy read (a slice or block at a time) allows one
    chunk :data:`MAX_CHUNK_BYTES` (the memory left is for the job that reads it to check:
    with little left, its own checks say what needs less); a whole read decodes one chunk at a
    time beside the array: the two must fit in ``max_bytes`` (default: half the memory left),
    as the array alone must."""
    from nbapp import memory

    chunk = tuple(int(c) for c in (getattr(arr, "chunks", None) or arr.shape))
    item = np.dtype(arr.dtype).itemsize
    chunk_bytes = float(np.prod(chunk, dtype=float)) * item
    array_bytes = float(np.prod([int(n) for n in arr.shape], dtype=float)) * item
    if lazy:
        budget = MAX_CHUNK_BYTES
        why = "every read of a slice or block decodes each chunk it touches whole"
    else:
        limit = max_bytes if max_bytes is not None \
            else READ_FRACTION * memory.available_bytes()
        source = "the limit for one image" if max_bytes is not None \
            else "half the memory this process has left"
        budget = max(0.0, limit - array_bytes)
        why = (f"beside its {format_bytes(array_bytes)} of data, within {source}, "
               f"{format_bytes(limit)}")
    if chunk_bytes <= budget:
        return
    plane = [1] * (len(arr.shape) - 2) + [min(int(n), 1024) for n in arr.shape[-2:]]
    raise OutOfMemory(
        f"out of memory: zarr {Path(where).name} is stored in chunks of "
        f"{' x '.join(map(str, chunk))} {np.dtype(arr.dtype)} ({format_bytes(chunk_bytes)} "
        f"decoded each), over the {format_bytes(budget)} a chunk may take ({why}); rechunk "
        f"the store to smaller chunks, e.g. {' x '.join(map(str, plane))}")


class LazyView:
    """A lazy array seen without its first ``drop`` axes (each of length 1: an OME-Zarr's
    time and channel), closing ``close`` (a file) when it goes: indexing reads only what is
    asked for."""

    def __init__(self, arr, drop: int = 0, close=None):
        self.arr, self.drop, self._close = arr, drop, close
        self.shape = tuple(arr.shape[drop:])
        self.dtype = arr.dtype
        self.ndim = len(self.shape)
        self.chunks = tuple(getattr(arr, "chunks", ())[drop:]) or None

    @classmethod
    def squeezed(cls, arr):
        """``arr`` without its leading axes of length 1 beyond three."""
        drop = 0
        while len(arr.shape) - drop > 3 and arr.shape[drop] == 1:
            drop += 1
        return cls(arr, drop) if drop else arr

    @classmethod
    def of_tiff(cls, file: str) -> "LazyView":
        """A compressed or tiled TIFF through tifffile's zarr view of its pages (decoding only
        the pages and tiles asked for); the file is closed with the view."""
        import tifffile
        import zarr

        store = tifffile.imread(file, aszarr=True)
        return cls(zarr.open(store, mode="r"), close=store.close)

    def __getitem__(self, index):
        index = index if isinstance(index, tuple) else (index,)
        return self.arr[(0,) * self.drop + index]

    def __array__(self, dtype=None, copy=None):
        data = np.asarray(self[...])
        return data if dtype is None else data.astype(dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def __del__(self):
        close, self._close = getattr(self, "_close", None), None
        if close is not None:
            close()


def _read_mrc(file: str, lazy: bool, meta: dict, limit: _Limit) -> np.ndarray:
    try:
        import mrcfile
    except ImportError:
        raise InputError("reading MRC files needs mrcfile: pip install 'nbapp[io]'") from None

    # permissive: read files with slightly non-standard headers; problems come back as warnings,
    # which are reported in the error (one line) instead of being printed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mrc = mrcfile.mmap(file, mode="r", permissive=True)
    try:
        if mrc.data is None:
            why = f": {caught[0].message}" if caught else ""
            raise InputError(f"MRC file {file!r} has no readable data{why}")
        vs = mrc.voxel_size
        if float(vs.x) > 0:
            meta["voxel_size"] = (float(vs.z) / 10, float(vs.y) / 10, float(vs.x) / 10)  # Å -> nm
        if lazy:
            return mrc.data
        limit(mrc.data.shape, mrc.data.dtype)
        return np.array(mrc.data)
    finally:
        if not lazy or mrc.data is None:
            mrc.close()


def _read_h5(file: str, dataset: str | None, lazy: bool, meta: dict, limit: _Limit, root):
    try:
        import h5py
    except ImportError:
        raise InputError("reading HDF5 files needs h5py: pip install 'nbapp[io]'") from None
    f = h5py.File(file, "r")
    try:
        names: list[str] = []
        # visititems follows hard links only: external links (to other files) are not listed
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        if not names:
            raise InputError(f"HDF5 file {file!r} holds no datasets")
        if dataset is None:
            if len(names) != 1:
                raise InputError(f"HDF5 file {file!r} holds datasets {names}: name one as "
                                 f"{file}:{names[0]}")
            dataset = names[0]
        if dataset.strip("/") not in names:
            raise InputError(f"HDF5 file {file!r} has no dataset {dataset!r}; it holds {names}")
        meta["dataset"] = dataset
        ds = f[dataset]
        if root is not None:
            # the raw data of these lives in other files, named by paths HDF5 resolves itself:
            # refused outright when reading is confined to a data root
            if ds.external:
                raise InputError(f"HDF5 dataset {dataset!r} of {Path(file).name} keeps its data "
                                 f"in external file(s) {[e[0] for e in ds.external]}, which is "
                                 "not allowed inside the data root; store the data in the file")
            if ds.is_virtual:
                raise InputError(f"HDF5 dataset {dataset!r} of {Path(file).name} is a virtual "
                                 "dataset mapping other files, which is not allowed inside the "
                                 "data root; store the data in the file")
        if "element_size_um" in ds.attrs:
            meta["voxel_size"] = tuple(1000.0 * float(v) for v in ds.attrs["element_size_um"])
        if lazy:  # the dataset keeps its file open; slices are read from disk when indexed
            lazy_ds, f = ds, None
            return lazy_ds
        limit(ds.shape, ds.dtype)
        return ds[...]
    finally:
        if f is not None:
            f.close()


#: Pillow modes read as they are (one grey band).
_GREY_MODES = ("L", "1", "I", "I;16", "I;16B", "F")


def _read_picture(file: str, meta: dict, limit: _Limit) -> np.ndarray:
    """PNG / JPEG with Pillow: grey as it is, RGB(A) and palette images converted to grey."""
    from PIL import Image

    try:
        im = Image.open(file)
    except Image.DecompressionBombError:
        raise InputError(f"{Path(file).name} has more pixels than Pillow will decode "
                         f"({Image.MAX_IMAGE_PIXELS * 2:,}): it is too large for a picture "
                         "format; save it as TIFF or zarr") from None
    with im:
        grey = im.mode in _GREY_MODES or im.mode == "LA"
        dtype = {"I": "i4", "F": "f4", "I;16": "u2", "I;16B": ">u2"}.get(im.mode, "u1")
        bands = 1 if grey else len(im.getbands())
        # Pillow's decoded image and the numpy copy; for colour also the RGB copy and the grey
        limit((im.height, im.width), dtype, factor=2 if grey else bands + 4)
        if im.mode in _GREY_MODES:
            return np.array(im)
        if im.mode == "LA":
            return np.array(im.getchannel("L"))
        rgb = np.array(im.convert("RGB"))
    if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]):
        return np.ascontiguousarray(rgb[..., 0])
    meta["converted"] = "RGB converted to grey"
    return np.array(Image.fromarray(rgb).convert("L"))


def stack_paths(out: str | os.PathLike) -> dict:
    """Where the per-plane stacks of a 3D job writing ``out`` go: OUT_xy.ext, OUT_xz.ext,
    OUT_yz.ext beside it.

    >>> sorted(p.name for p in stack_paths("d/labels.zarr").values())
    ['labels_xy.zarr', 'labels_xz.zarr', 'labels_yz.zarr']
    """
    out = Path(out)
    return {p: out.with_name(f"{out.stem}_{p}{out.suffix}") for p in ("xy", "xz", "yz")}


def write_labels(path: str | os.PathLike, labels: np.ndarray, chunks: tuple | None = None) -> Path:
    """Write a label image or volume to ``.tif``/``.tiff`` or ``.zarr`` atomically.

    The data goes to a temporary (hidden) name in the target folder and is renamed when
    complete; an existing target is replaced only then. A failed write leaves the target as it
    was and no temporary files.

    Raises
    ------
    InputError
        Unknown extension, missing folder, or the write failed (disk full, permissions, ...).
    """
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in WRITE_FORMATS:
        raise InputError(f"cannot write labels to {str(path)!r}: use one of "
                         f"{', '.join(WRITE_FORMATS)}")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"output folder {str(folder)!r} does not exist")
    if ext != ".zarr" and path.is_dir():
        raise InputError(f"cannot write {str(path)!r}: it is an existing folder")
    labels = labels if hasattr(labels, "shape") and hasattr(labels, "dtype") else np.asarray(labels)
    remove_stale_temporaries(path)
    tmp = folder / _temp_name(path.name, "part" + ext)
    try:
        if ext in (".tif", ".tiff"):
            import tifffile

            tifffile.imwrite(tmp, np.asarray(labels), compression="zlib", photometric="minisblack")
            os.replace(tmp, path)
        else:
            import zarr

            chunks = chunks or _default_chunks(labels.shape)
            store = zarr.open(str(tmp), mode="w", shape=labels.shape, dtype=labels.dtype,
                              chunks=chunks)
            # slab by slab (one chunk row along the first axis at a time): works for arrays that
            # are memory-mapped or lazily computed without materialising a second full copy
            step = chunks[0] if labels.ndim > 2 else labels.shape[0]
            for s0 in range(0, labels.shape[0], max(1, step)):
                store[s0 : s0 + step] = np.asarray(labels[s0 : s0 + step])
            _replace_tree(tmp, path)
    except OSError as exc:
        raise InputError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink()
    return path


def _replace_tree(new: Path, target: Path) -> None:
    """Rename folder ``new`` to ``target``, replacing ``target`` (file or folder) if it exists;
    on failure ``target`` is restored."""
    if not target.exists():
        os.replace(new, target)
        return
    old = target.parent / _temp_name(target.name, "old")
    old.mkdir()
    try:
        os.replace(target, old / target.name)
        try:
            os.replace(new, target)
        except OSError:
            os.replace(old / target.name, target)
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def write_small(target: str | os.PathLike, write, mode: str = "wb", **open_kw) -> Path:
    """Write a small file (a table, a training slice) through ``write(file)`` under a hidden
    temporary name in its folder, renamed onto ``target`` when complete: a failed write leaves
    nothing. Raises :class:`InputError` with the reason."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        with open(tmp, mode, **open_kw) as f:
            write(f)
        os.replace(tmp, target)
    except OSError as exc:
        raise InputError(f"cannot write {str(target)!r}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


def check_writable(path: str | os.PathLike) -> None:
    """Fail now, before any work, unless a file can be created beside ``path``.

    Raises
    ------
    InputError
        The output folder is missing, or refuses a new file (read-only file system,
        permissions, disk full), with the system's reason.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"output folder {str(folder)!r} does not exist")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".probe")
    except OSError as exc:
        raise InputError(f"cannot write {str(path)!r}: the folder {str(folder)!r} refuses new "
                         f"files ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)


def _temp_name(name: str, kind: str) -> str:
    """Hidden name of a temporary beside ``name``: it says which host and process made it, so
    that a later run can tell a dead writer's leftovers from a live writer's work."""
    return f".{name}.{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.{kind}"


def pid_alive(pid: int) -> bool:
    """True unless no process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove what writers of ``path`` that died (``kill -9``, power loss) left beside it.

    A writer's temporaries are named ``.NAME.HOST-PID-RANDOM.part.EXT`` (the data being
    written) and ``.NAME.HOST-PID-RANDOM.old`` (the previous output while it is replaced); those
    of this host whose process is gone are removed, and a previous output that was moved
    aside but never replaced is put back. Temporaries of live processes and of other hosts are
    left alone. Returns what was removed.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{{8}}"
                         rf"\.(?P<kind>part{re.escape(path.suffix)}|old)$")
    host = socket.gethostname()
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if not m or m["host"] != host or pid_alive(int(m["pid"])):
            continue
        stale = Path(entry.path)
        if m["kind"] == "old" and not path.exists() and (stale / path.name).exists():
            os.replace(stale / path.name, path)  # the interrupted writer had moved it aside
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed.append(stale)
    return removed


def _default_chunks(shape: tuple) -> tuple:
    if len(shape) == 2:
        return tuple(min(s, 1024) for s in shape)
    return (1,) * (len(shape) - 2) + tuple(min(s, 1024) for s in shape[-2:])
