"""The end of a blockwise job: the pieces of objects cut by block faces joined, and the
labels written, numbered 1..N by first appearance, as an OME-Zarr multiscale image."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Generator

import numpy as np

from nbapp.blockwise.progress import BlockProgress
from nbapp.blockwise.store import WorkStore
from nbapp.errors import InputError
from nbapp.params import ConsensusParams
from nbapp.stitch import join_objects, uid_base

__all__ = ["join_steps", "write_output", "output_chunks", "pyramid_factors", "coarse_level"]


def join_steps(store: WorkStore, consensus: ConsensusParams, layer: str = "labels"
               ) -> Generator[BlockProgress, None, tuple[dict, list]]:
    """The pieces of one layer's objects in every block joined (the blocks' pieces of one
    object carry its id, :meth:`WorkStore.write_global`), then
    :func:`~nbapp.stitch.join_objects` (the filters, numbering by first appearance)."""
    tables, pieces = {}, [np.zeros((0, 2), np.int64)]
    n = len(store.grid)
    for k, block in enumerate(store.grid):
        table, ids = store.read_record(block.index, layer)
        tables[block.index] = table
        local = table["ids"]
        pieces.append(np.stack([ids[local], local + uid_base(block.index)], axis=1))
        yield BlockProgress("blocks", "joining", k + 1, n, f"joining the {layer} pieces")
    pieces = np.concatenate(pieces)
    pieces = pieces[np.lexsort((pieces[:, 1], pieces[:, 0]))]
    same = pieces[1:, 0] == pieces[:-1, 0]
    pairs = np.stack([pieces[:-1, 1][same], pieces[1:, 1][same]], axis=1)
    return join_objects(tables, pairs, consensus.min_size, consensus.min_extent)


def _relabel_chunk(chunk: np.ndarray, luts: dict, grid_shape: tuple, semantic_scale: int,
                   block_info=None) -> np.ndarray:
    if semantic_scale:
        return (chunk * semantic_scale).astype(np.int32)
    index = int(np.ravel_multi_index(block_info[0]["chunk-location"], grid_shape))
    lut = luts[index]
    local = (chunk - uid_base(index)).clip(0, lut.size - 1)
    return np.where(chunk > 0, lut[local], 0).astype(np.int32)


def output_chunks(shape: tuple) -> tuple:
    """Chunks of the written labels: slabs of 32 slices of 256 x 256 (a slice viewer reads few
    of them, a 3D reader not too many)."""
    return tuple(min(s, c) for s, c in zip(shape, (32, 256, 256)))


def pyramid_factors(shape: tuple, smallest: int = 64) -> list[dict]:
    """Downsampling factors of the output's multiscale levels (2, 4, ... along each axis
    while the level stays at least ``smallest`` voxels along its largest side).

    >>> [f["x"] for f in pyramid_factors((100, 1000, 1000))]
    [2, 4, 8]
    """
    out, f = [], 2
    while max(shape) // f >= smallest:
        out.append({a: (f if n // f >= 1 else 1) for a, n in zip("zyx", shape)})
        f *= 2
    return out


def coarse_level(path: str | os.PathLike, max_side: int = 160) -> tuple[np.ndarray, int]:
    """The first level of an OME-Zarr output whose largest side is at most ``max_side`` (else
    the coarsest), read into memory, and its downsampling factor (a 3D preview of labels
    larger than memory)."""
    import zarr

    group = zarr.open_group(str(path), mode="r")
    datasets = group.attrs["ome"]["multiscales"][0]["datasets"]
    base = group[datasets[0]["path"]].shape
    chosen = datasets[-1]["path"]
    for d in datasets:
        if max(group[d["path"]].shape) <= max_side:
            chosen = d["path"]
            break
    arr = np.asarray(group[chosen][...])
    return arr, int(round(max(b / s for b, s in zip(base, arr.shape))))


def write_output(store: WorkStore, luts: dict, output: Path, voxel_size: tuple | None,
                 semantic_scale: int = 0, layer: str = "labels") -> Path:
    """One layer's final labels as an OME-Zarr multiscale image (nearest-neighbour pyramid),
    written under a temporary name and renamed onto ``output`` when complete."""
    import warnings

    import dask
    import dask.array as da
    import zarr

    with warnings.catch_warnings():  # the module builds a deprecated Scaler as a default
        warnings.simplefilter("ignore", DeprecationWarning)
        from ome_zarr.scale import Methods
        from ome_zarr.writer import write_image

    from nbapp.io import _replace_tree, _temp_name, remove_stale_temporaries

    grid_shape = tuple(max(b.position[a] for b in store.grid) + 1 for a in range(3))
    src = da.from_zarr(store.labels(layer=layer))
    labels = src.map_blocks(_relabel_chunk, luts, grid_shape, semantic_scale, dtype=np.int32)
    shape = tuple(store.shape)
    labels = labels.rechunk(output_chunks(shape))
    remove_stale_temporaries(output)
    tmp = output.parent / _temp_name(output.name, "part" + output.suffix)
    try:
        group = zarr.open_group(str(tmp), mode="w")
        scale = {a: float(v) for a, v in zip("zyx", voxel_size)} if voxel_size else None
        with dask.config.set({"array.chunk-size": "64MiB"}):
            write_image(labels, group, scale_factors=pyramid_factors(shape),
                        method=Methods.NEAREST, axes="zyx", scale=scale,
                        axes_units={a: "nanometer" for a in "zyx"} if voxel_size else None,
                        storage_options={"chunks": output_chunks(shape)}, name="labels")
        _replace_tree(tmp, output)
    except OSError as exc:
        raise InputError(f"cannot write {str(output)!r}: {exc.strerror or exc}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return output
