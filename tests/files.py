"""Writing test arrays in every format nbapp reads (no torch needed here)."""

from __future__ import annotations

from pathlib import Path

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
