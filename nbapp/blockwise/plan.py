"""How a blockwise job cuts its work: slabs of whole slices for the network, blocks for
tracking and consensus, and the memory each may use.

>>> slabs(100, 32)
[(0, 25), (25, 50), (50, 75), (75, 100)]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from nbapp.params import VolumeParams
from nbapp.stitch import splits
from nbapp.volume import plane_axis

__all__ = ["BlockParams", "DEFAULT_BLOCK_BUDGET", "MAX_SLAB", "default_budget",
           "choose_block_size", "needs_blockwise", "slab_thickness", "slabs"]

#: Memory a block may use by default (the model and the interpreter come on top): with
#: :data:`BLOCK_BYTES_PER_VOXEL`, a 224-voxel cube.
DEFAULT_BLOCK_BUDGET = 1200 << 20
#: Peak bytes per voxel of a block's work: writing an ortho-plane block (its three tracked
#: stacks read as int64, their lookups and the objects' table) peaks 76 bytes a voxel above
#: the stacks read, counting 20 (``python bench/bench_blockwise.py --part blockmem``: 192 and
#: 256-voxel blocks), so 100 with the stacks.
BLOCK_BYTES_PER_VOXEL = 100
#: Block sides are multiples of this unless the volume is smaller.
_SIDE_STEP = 16
#: Most slices of one plane that one network unit (a *slab*) infers and writes: its labels
#: are one chunk of the work store's per-slice stack along the slicing axis.
MAX_SLAB = 32
#: Bytes a slab holds per pixel of each of its slices: in the network stage the slices read
#: (at most 4 bytes a voxel) and their per-slice labels (int32); in the tracking stage the
#: labels read (int32) and the tracked ones (int64), with a slice of temporaries.
SLAB_BYTES_PER_PIXEL = 16


@dataclass(frozen=True)
class BlockParams:
    """How a volume is cut into blocks.

    The network always sees whole slices and the blocks' filters and consensus are decided for
    the whole volume, so blocks need no margin and the labels do not depend on these settings.

    Parameters
    ----------
    block_size : int or (int, int, int), optional
        Largest side of a block in voxels (one per axis, or one for all). Default: the largest
        that keeps a block's work within ``memory_budget``.
    memory_budget : int, optional
        Bytes a block or a slab of slices may use (default :data:`DEFAULT_BLOCK_BUDGET`).
    """

    block_size: Any = None
    memory_budget: int | None = None

    def __post_init__(self) -> None:
        from nbapp.errors import ParameterError

        if self.block_size is not None:
            sizes = (self.block_size,) if np.isscalar(self.block_size) else tuple(self.block_size)
            if len(sizes) not in (1, 3) or any(isinstance(s, bool) or int(s) != s or s < 8
                                               for s in sizes):
                raise ParameterError(f"block_size must be one side or three sides of at least 8 "
                                     f"voxels, got {self.block_size!r}")
            object.__setattr__(self, "block_size",
                               int(sizes[0]) if len(sizes) == 1 else tuple(int(s) for s in sizes))
        if self.memory_budget is not None and self.memory_budget < (64 << 20):
            raise ParameterError(f"memory_budget must be at least 64 MiB, got {self.memory_budget}")


def default_budget() -> int:
    """:data:`DEFAULT_BLOCK_BUDGET`, or half the memory this process has left when that is
    less (a container with little memory gets smaller blocks, not a killed kernel)."""
    from nbapp.memory import available_bytes

    return int(max(64 << 20, min(DEFAULT_BLOCK_BUDGET, available_bytes() // 2)))


def choose_block_size(shape: tuple, params: VolumeParams, blocks: BlockParams = BlockParams()
                      ) -> tuple:
    """The block side of each axis: ``blocks.block_size`` when given, else the largest cube
    (a multiple of 16) whose work fits ``blocks.memory_budget`` (default
    :func:`default_budget`), at least 64; along an axis where the volume is thinner than that
    the block takes the whole axis and the other sides grow to use the budget.

    >>> choose_block_size((1000, 2000, 2000), VolumeParams(), BlockParams(memory_budget=1200 << 20))
    (224, 224, 224)
    >>> choose_block_size((50, 2000, 2000), VolumeParams(), BlockParams(block_size=100))
    (50, 100, 100)
    >>> choose_block_size((165, 768, 1024), VolumeParams(), BlockParams(memory_budget=1200 << 20))
    (165, 272, 272)
    """
    if blocks.block_size is not None:
        sides = blocks.block_size if isinstance(blocks.block_size, tuple) \
            else (blocks.block_size,) * 3
    else:
        budget = blocks.memory_budget or default_budget()
        voxels = budget / BLOCK_BYTES_PER_VOXEL
        sides = [_side(voxels ** (1 / 3))] * 3
        # an axis along which the volume is thinner than a block takes all of it: its share
        # of the budget goes to the other axes (fewer blocks)
        while True:
            whole = [a for a in range(3) if shape[a] <= sides[a]]
            rest = [a for a in range(3) if shape[a] > sides[a]]
            if not whole or not rest:
                break
            side = _side((voxels / np.prod([shape[a] for a in whole])) ** (1 / len(rest)))
            if side <= sides[rest[0]]:
                break
            for a in rest:
                sides[a] = side
    return tuple(int(min(s, n)) for s, n in zip(sides, shape))


def _side(side: float) -> int:
    """A block side: ``side`` down to a multiple of 16, at least 64."""
    return max(64, int(round(side)) // _SIDE_STEP * _SIDE_STEP)


def needs_blockwise(shape: tuple, params: VolumeParams, engine=None) -> bool:
    """True when the in-memory 3D job on ``shape`` would not fit in the memory left (the
    test :func:`nbapp.volume.check_job_memory` makes: 90 % of it)."""
    from nbapp.memory import available_bytes
    from nbapp.volume import job_memory

    return job_memory(tuple(shape), params, engine) > 0.9 * available_bytes()


def slab_thickness(shape: tuple, plane: str, params: VolumeParams, budget: int | None = None,
                   engine=None) -> int:
    """Slices of ``plane`` per slab: as many as fit ``budget`` (default
    :func:`default_budget`) with their median neighbours, the network's working memory and the
    window of network outputs, at most :data:`MAX_SLAB`, at least 1.

    >>> slab_thickness((1000, 1000, 1000), "xz", VolumeParams(), 64 << 20)
    2
    >>> slab_thickness((165, 768, 1024), "xy", VolumeParams(), 1200 << 20)
    32
    """
    ax = plane_axis(plane)
    side = tuple(int(s) for i, s in enumerate(shape) if i != ax)
    area = side[0] * side[1]
    r = (params.median_size - 1) // 2
    fixed = 0
    if engine is not None and hasattr(engine, "memory_needed"):
        fixed = engine.memory_needed(side, 2 * r + getattr(engine, "batch_size", 1),
                                     params.slice.downsampling)
    budget = budget or default_budget()
    fit = (budget - fixed) // (area * SLAB_BYTES_PER_PIXEL) - 2 * r
    return int(min(MAX_SLAB, shape[ax], max(1, fit)))


def slabs(n: int, thickness: int) -> list[tuple[int, int]]:
    """The slabs of an axis of ``n`` slices: the fewest of at most ``thickness`` slices, of
    one length but the last (one zarr chunk each)."""
    return splits(n, thickness)
