"""Reading images / volumes and writing labels: TIFF, NumPy, zarr / OME-Zarr, MRC, HDF5, PNG.

Readers return the array (lazily where the format allows it) and a metadata dict with the voxel
size when the file gives one. Writers go to a temporary name beside the target and rename it
when complete, so a failed or interrupted write never leaves a half-written output.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import numpy as np

from nbapp.errors import InputError

__all__ = ["read_image", "write_labels", "READ_FORMATS", "WRITE_FORMATS", "split_h5_path"]

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


def _suffix(path: str) -> str:
    return Path(path.rstrip("/")).suffix.lower()


def read_image(path: str | os.PathLike, lazy: bool = False) -> tuple[np.ndarray, dict]:
    """Read an image, stack or volume; return ``(array, meta)``.

    Parameters
    ----------
    path : str
        ``.tif``/``.tiff``, ``.npy``, ``.zarr`` (an array, or OME-Zarr: level 0), ``.mrc``,
        ``FILE.h5:dataset`` (the dataset may be omitted when the file holds only one),
        ``.png``/``.jpg`` (RGB is converted to grey).
    lazy : bool
        Return a memory-mapped or zarr array where possible instead of loading into memory.

    Returns
    -------
    array : (H, W) or (Z, Y, X) array
    meta : dict
        ``path``, ``format`` and, when known, ``voxel_size`` (Z, Y, X) in nm.
    """
    spath = os.fspath(path)
    file, dataset = split_h5_path(spath)
    ext = _suffix(file)
    if ext not in READ_FORMATS:
        raise InputError(f"cannot read {spath!r}: unknown file type {ext or '(none)'}; "
                         f"supported: {', '.join(READ_FORMATS)}")
    if not os.path.exists(file):
        raise InputError(f"input {file!r} does not exist")
    meta: dict = {"path": spath, "format": ext.lstrip(".")}
    try:
        if ext in (".tif", ".tiff"):
            arr = _read_tiff(file, lazy, meta)
        elif ext == ".npy":
            arr = np.load(file, mmap_mode="r" if lazy else None, allow_pickle=False)
        elif ext == ".zarr":
            arr = _read_zarr(file, lazy, meta)
        elif ext in (".mrc", ".map", ".rec"):
            arr = _read_mrc(file, lazy, meta)
        elif ext in (".h5", ".hdf5"):
            arr = _read_h5(file, dataset, meta)
        else:
            arr = _read_picture(file, meta)
    except InputError:
        raise
    except (OSError, ValueError, KeyError, TypeError, EOFError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot read {spath!r} as {ext.lstrip('.').upper()}: {msg}") from None
    return arr, meta


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


def _read_tiff(file: str, lazy: bool, meta: dict) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(file) as tif:
        if not tif.pages:
            raise InputError(f"TIFF {file!r} has no images")
        vs = _tiff_voxel_size(tif)
        if vs:
            meta["voxel_size"] = vs
        if lazy:
            try:
                return tifffile.memmap(file, mode="r")
            except ValueError:
                pass
        return tif.asarray()


def _read_zarr(file: str, lazy: bool, meta: dict) -> np.ndarray:
    import zarr

    try:
        node = zarr.open(file, mode="r")
    except Exception as exc:  # zarr raises many types for non-zarr folders
        raise InputError(f"cannot open {file!r} as zarr: {exc}") from None
    if hasattr(node, "shape") and hasattr(node, "dtype"):
        arr = node
    else:
        attrs = dict(node.attrs)
        ome = attrs.get("ome", attrs)
        multiscales = ome.get("multiscales")
        if multiscales:
            ds = multiscales[0]["datasets"][0]
            arr = node[ds["path"]]
            meta["format"] = "ome-zarr"
            for t in ds.get("coordinateTransformations", []):
                if t.get("type") == "scale":
                    meta["voxel_size"] = tuple(float(v) for v in t["scale"][-3:])
        else:
            names = [k for k, v in node.arrays()] if hasattr(node, "arrays") else []
            if len(names) != 1:
                raise InputError(f"zarr group {file!r} holds arrays {names}: give the array's path "
                                 f"(e.g. {file}/{names[0] if names else 'name'})")
            arr = node[names[0]]
    return arr if lazy else np.asarray(arr[...])


def _read_mrc(file: str, lazy: bool, meta: dict) -> np.ndarray:
    try:
        import mrcfile
    except ImportError:
        raise InputError("reading MRC files needs mrcfile: pip install 'nbapp[io]'") from None
    if lazy:
        mrc = mrcfile.mmap(file, mode="r", permissive=True)
    else:
        mrc = mrcfile.open(file, mode="r", permissive=True)
    if mrc.data is None:
        raise InputError(f"MRC file {file!r} has no data (corrupt header?)")
    vs = mrc.voxel_size
    if float(vs.x) > 0:
        meta["voxel_size"] = (float(vs.z) / 10, float(vs.y) / 10, float(vs.x) / 10)  # Å -> nm
    data = mrc.data if lazy else np.array(mrc.data)
    if not lazy:
        mrc.close()
    return data


def _read_h5(file: str, dataset: str | None, meta: dict) -> np.ndarray:
    try:
        import h5py
    except ImportError:
        raise InputError("reading HDF5 files needs h5py: pip install 'nbapp[io]'") from None
    with h5py.File(file, "r") as f:
        names: list[str] = []
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        if dataset is None:
            if len(names) != 1:
                raise InputError(f"HDF5 file {file!r} holds datasets {names}: name one as "
                                 f"{file}:{names[0] if names else 'dataset'}")
            dataset = names[0]
        if dataset.strip("/") not in names:
            raise InputError(f"HDF5 file {file!r} has no dataset {dataset!r}; it holds {names}")
        meta["dataset"] = dataset
        ds = f[dataset]
        if "element_size_um" in ds.attrs:
            meta["voxel_size"] = tuple(1000.0 * float(v) for v in ds.attrs["element_size_um"])
        return ds[...]


def _read_picture(file: str, meta: dict) -> np.ndarray:
    from skimage import io as skio

    arr = skio.imread(file)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        rgb = arr[..., :3]
        if np.all(rgb[..., 0] == rgb[..., 1]) and np.all(rgb[..., 1] == rgb[..., 2]):
            arr = np.ascontiguousarray(rgb[..., 0])
        else:
            from skimage.color import rgb2gray

            arr = (rgb2gray(rgb) * 255).round().astype(np.uint8)
            meta["converted"] = "RGB converted to grey"
    return arr


def write_labels(path: str | os.PathLike, labels: np.ndarray, chunks: tuple | None = None) -> Path:
    """Write a label image or volume to ``.tif``/``.tiff`` or ``.zarr`` atomically.

    The data goes to a temporary name in the target folder and is renamed when complete; an
    existing target is replaced only then.
    """
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in WRITE_FORMATS:
        raise InputError(f"cannot write labels to {str(path)!r}: use one of {', '.join(WRITE_FORMATS)}")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"output folder {str(folder)!r} does not exist")
    labels = np.asarray(labels)
    tmp = folder / f".{path.name}.{uuid.uuid4().hex[:8]}.part{ext}"
    try:
        if ext in (".tif", ".tiff"):
            import tifffile

            tifffile.imwrite(tmp, labels, compression="zlib", photometric="minisblack")
            os.replace(tmp, path)
        else:
            import zarr

            store = zarr.open(str(tmp), mode="w", shape=labels.shape, dtype=labels.dtype,
                              chunks=chunks or _default_chunks(labels.shape))
            store[...] = labels
            if path.exists():
                old = Path(tempfile.mkdtemp(dir=folder, prefix=f".{path.name}.old."))
                os.replace(path, old / path.name)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink()
    return path


def _default_chunks(shape: tuple) -> tuple:
    if len(shape) == 2:
        return tuple(min(s, 1024) for s in shape)
    return (1,) * (len(shape) - 2) + tuple(min(s, 1024) for s in shape[-2:])
