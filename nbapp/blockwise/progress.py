"""What a blockwise job reports while it runs, and what it returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from nbapp.errors import InputError

__all__ = ["BlockProgress", "BlockwiseResult"]


@dataclass(frozen=True)
class BlockProgress:
    """A progress report of a blockwise job: ``done`` of ``total`` parts (the network's
    slabs, then the blocks; stage ``"network"``, so that the job runner shows an ETA, with
    ``detail`` saying which), then joining and writing."""

    plane: str
    stage: str
    done: int
    total: int
    detail: str | None = None
    #: A one-line message for the user, given once (why an earlier run's blocks were not
    #: resumed); the first report's ``detail`` carries it too
    note: str | None = None


@dataclass
class BlockwiseResult:
    """What a blockwise job wrote: the output store, its objects and where the time went."""

    path: Path
    shape: tuple
    objects: int
    blocks: int
    skipped: int
    block_size: tuple
    timings: dict = field(default_factory=dict)
    #: One row per object (id, voxels, bbox, centroid, extent), as nbapp.objects.object_table
    table: list = field(default_factory=list)
    #: Where each plane's stack was written ({"xy": path, ...}; with ``return_stacks``)
    stacks: dict = field(default_factory=dict)
    #: How many objects each of those stacks has
    stack_objects: dict = field(default_factory=dict)
    #: "segment" (a blockwise 3D job) or "consensus" (from stored stacks)
    kind: str = "segment"
    #: Slabs of slices the network stage had (all planes) and how many an earlier run had
    #: written already (their network outputs were reused)
    slabs: int = 0
    slabs_skipped: int = 0

    def labels(self):
        """The labels (level 0 of the output), read lazily."""
        from nbapp.io import read_image

        return read_image(self.path, lazy=True)[0]

    def stack(self, plane: str):
        """One plane's stack (level 0), read lazily."""
        from nbapp.io import read_image

        if plane not in self.stacks:
            raise InputError(f"this job wrote no {plane} stack (it wrote "
                             f"{sorted(self.stacks) or 'none'}): run it with return_stacks")
        return read_image(self.stacks[plane], lazy=True)[0]

    def resumed_text(self) -> str:
        """What an earlier run had done, for the end-of-job line ('' when nothing).

        >>> BlockwiseResult(Path("o.zarr"), (1, 1, 1), 0, 4, 2, (1, 1, 1)).resumed_text()
        ', 2 of them from an earlier run'
        >>> BlockwiseResult(Path("o.zarr"), (1, 1, 1), 0, 4, 0, (1, 1, 1), slabs=5,
        ...                 slabs_skipped=3).resumed_text()
        ', the network outputs of 3 of 5 slabs of slices from an earlier run'
        """
        if self.skipped:
            return f", {self.skipped} of them from an earlier run"
        if self.slabs_skipped:
            return (f", the network outputs of {self.slabs_skipped} of {self.slabs} slabs of "
                    "slices from an earlier run")
        return ""
