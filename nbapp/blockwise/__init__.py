"""Blockwise 3D inference: volumes larger than memory, resumable, on every device or a Dask
cluster, with the labels of the in-memory job.

The parts, in the order a job uses them:

* :mod:`~nbapp.blockwise.plan`: the block grid and the slabs of slices, sized to a memory
  budget;
* :mod:`~nbapp.blockwise.identity`: what the input and the job are (a re-run resumes only the
  same job; another model or input starts fresh, and says why);
* :mod:`~nbapp.blockwise.store`: the work store beside the output, where finished parts are
  kept;
* :mod:`~nbapp.blockwise.network`: the network stage: per-slice labels of *whole* slices, slab
  by slab (the network never sees a piece of a slice, so its outputs do not depend on the
  tiling);
* :mod:`~nbapp.blockwise.tracks`: the tracking stage: each plane's per-slice labels linked
  through whole slices, a slice at a time;
* :mod:`~nbapp.blockwise.blocks`: the block stage: the filters and the consensus decided for
  the whole volume from tables that blocks add up, then applied block by block;
* :mod:`~nbapp.blockwise.output`: the pieces of each object in the blocks joined
  (:func:`nbapp.stitch.join_objects`), the labels written as an OME-Zarr multiscale image;
* :mod:`~nbapp.blockwise.workers`: where the parts run (this process, one worker process per
  device, Dask tasks);
* :mod:`~nbapp.blockwise.job`: the jobs, :func:`blockwise_steps` and
  :func:`consensus_blockwise_steps`.

Memory: one slab of whole slices or one block at a time per worker (sizes set by the budget)
plus the work store's small tables; nothing the size of the volume is ever held. The labels
are the in-memory job's, voxel for voxel, whatever the block size, the budget or the workers.
"""

from nbapp.blockwise.identity import VolumeSource, array_digest, file_stamp, input_id
from nbapp.blockwise.job import blockwise_steps, consensus_blockwise_steps
from nbapp.blockwise.output import coarse_level, join_steps, pyramid_factors, write_output
from nbapp.blockwise.plan import (DEFAULT_BLOCK_BUDGET, BlockParams, choose_block_size,
                                  default_budget, needs_blockwise, slab_thickness)
from nbapp.blockwise.progress import BlockProgress, BlockwiseResult
from nbapp.blockwise.store import WorkStore

__all__ = ["BlockParams", "BlockProgress", "BlockwiseResult", "VolumeSource", "WorkStore",
           "coarse_level", "consensus_blockwise_steps", "choose_block_size", "blockwise_steps",
           "needs_blockwise", "default_budget", "slab_thickness", "join_steps", "write_output",
           "pyramid_factors", "array_digest", "file_stamp", "input_id",
           "DEFAULT_BLOCK_BUDGET"]
