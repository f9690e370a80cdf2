"""Writing test arrays in every format nbapp reads (no torch needed here)."""

from __future__ import annotations

from pathlib import Path

import struct
import zlib

import numpy as np


def save_as(path: Path, array: np.ndarray, **tiff_options) -> Path:
    """Write ``array`` to ``path`` in the format its extension names (TIFF, NumPy, zarr,
    HDF5 as ``raw``, MRC, PNG / JPEG for one 2D uint8 image)."""
    ext = Path(path).suffix.lower()
    if ext in (".tif", ".tiff"):
        import tifffile

        tifffile.imwrite(path, array, photometric="minisblack", **tiff_options)
    elif ext == ".npy":
        np.save(path, array)
    elif ext == ".zarr":
        import zarr

        z = zarr.open(str(path), mode="w", shape=array.shape, dtype=array.dtype)
        z[...] = array
    elif ext in (".h5", ".hdf5"):
        import h5py

        with h5py.File(path, "w") as f:
            f["raw"] = array
    elif ext in (".mrc", ".map", ".rec"):
        import mrcfile

        with mrcfile.new(path, overwrite=True) as m:
            m.set_data(array)
    elif ext in (".png", ".jpg", ".jpeg"):
        from PIL import Image

        Image.fromarray(array).save(path)
    else:
        raise ValueError(f"save_as: no writer for {ext!r}")
    return Path(path)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def png_of_zeros(path: Path, width: int, height: int) -> None:
    """A real grey PNG of zeros, written row by row (never held in memory)."""
    chunk = png_chunk
    comp = zlib.compressobj(9)
    row = b"\x00" * (width + 1)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
