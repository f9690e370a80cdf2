"""Blockwise 3D (volumes larger than memory): geometry, joining, resume, workers, CLI."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import tifffile
from models import LabelEngine, data_path, ellipsoids, f1_score

from nbapp.blockwise import (BlockParams, WorkStore, blockwise_steps, choose_block_size,
                             pyramid_factors)
from nbapp.errors import InputError, ParameterError
from nbapp.io import read_image
from nbapp.params import ConsensusParams, VolumeParams
from nbapp.run3d import drain
from nbapp.stitch import (block_grid, core_table, join_objects,
                          uid_base)
from nbapp.volume import Cancelled, volume_steps

NO_FILTER = VolumeParams(consensus=ConsensusParams(min_size=0, min_extent=0))


def in_memory(volume, params):
    return drain(volume_steps(LabelEngine(), volume.astype(np.float32), params)).labels


def blockwise(volume, out, params, block, **kw):
    res = drain(blockwise_steps([LabelEngine()], volume, out, params,
                                BlockParams(block_size=block), **kw))
    return res, np.asarray(res.labels()[...])


# -- geometry and joining on literal arrays -------------------------------------------------------

def test_grid_tiles_the_volume_without_thin_blocks():
    blocks = block_grid((100, 70, 33), 32)
    cover = np.zeros((100, 70, 33), np.int32)
    for b in blocks:
        cover[tuple(slice(lo, hi) for lo, hi in b.core)] += 1
    assert (cover == 1).all()
    assert min(min(b.shape) for b in blocks) >= 11  # 33 -> 11 + 11 + 11, not 32 + 1
    # equal cores (one zarr chunk each) except at the far ends
    assert len({b.shape for b in blocks if all(p == 0 for p in b.position)}) == 1


@pytest.mark.parametrize("shape, block", [((20, 50, 61), 16), ((165, 768, 1024), (165, 432, 432)),
                                          ((1001, 13, 7), 500)])
def test_every_core_is_one_chunk_of_the_work_store(shape, block):
    """Cores start at multiples of the first core's side along each axis (a block never
    writes into two zarr chunks; a 1024-voxel axis in 341 / 342 / 341 broke that)."""
    blocks = block_grid(shape, block)
    first = [hi - lo for lo, hi in blocks[0].core]
    for b in blocks:
        for (lo, hi), step, n in zip(b.core, first, shape):
            assert lo % step == 0 and (hi - lo == step or hi == n)


def test_store_join_and_write_on_an_uneven_grid(tmp_path):
    """Blocks of 7 / 7 / 6 voxels along an axis: each block's labels land in its own chunk and
    the written labels are the volume's (objects across faces joined, ids by first voxel)."""
    from nbapp.blockwise import join_steps, write_output
    from nbapp.stitch import to_slices
    from nbapp.tracking import relabel_by_first_appearance

    truth = ellipsoids((20, 50, 61), n=6, seed=9)
    store = WorkStore(tmp_path / "out.zarr")
    store.open({"test": 1}, truth.shape, (16, 17, 21))
    assert sorted({b.core[2] for b in store.grid}) == [(0, 21), (21, 42), (42, 61)]
    for b in store.grid:  # ids that are one object wherever they occur
        store.write_global(b, {"labels": truth[to_slices(b.core)]}, semantic=False)
    luts, rows = drain(join_steps(store, ConsensusParams(min_size=0, min_extent=0)))
    write_output(store, luts, tmp_path / "out.zarr", None)
    store.remove()
    out = np.asarray(read_image(tmp_path / "out.zarr")[0])
    assert np.array_equal(out, relabel_by_first_appearance(truth))
    assert len(rows) == int(truth.max())


def test_join_filters_the_joined_object_not_its_pieces():
    # an object of 2 x 20 voxels cut into two pieces, and a 20-voxel object alone
    a = np.zeros((2, 2, 10), np.int32)
    a[0, 0, :] = 1
    a[1, 1, :] = 1  # piece of the big one: 20 voxels
    b = np.zeros((2, 2, 10), np.int32)
    b[:, 0, :] = 1  # its other piece
    b[:, 1, :] = 2  # a small object
    ta = core_table(a, ((0, 2), (0, 2), (0, 10)), (2, 2, 20))
    tb = core_table(b, ((0, 2), (0, 2), (10, 20)), (2, 2, 20))
    pairs = np.array([[uid_base(0) + 1, uid_base(1) + 1]])
    luts, rows = join_objects({0: ta, 1: tb}, pairs, min_size=30, min_extent=0)
    assert [r["voxels"] for r in rows] == [40]
    assert luts[0][1] == 1 and luts[1][1] == 1 and luts[1][2] == 0
    from nbapp.objects import object_table

    whole = np.concatenate([a, np.where(b == 1, 1, 0)], axis=2)
    ref = object_table(whole)[0]
    assert (rows[0]["bbox"], rows[0]["centroid"], rows[0]["extent"]) == \
        (ref["bbox"], ref["centroid"], ref["extent"]) == ((0, 0, 0, 2, 2, 20), (0.5, 0.2, 9.5),
                                                          (2, 2, 20))


# -- the whole job against the in-memory one (a perfect network) ------------------------------------

def test_object_spanning_eight_blocks_is_one_object(tmp_path):
    vol = np.zeros((64, 64, 64), np.float32)
    zz, yy, xx = np.indices(vol.shape)
    vol[(zz - 32) ** 2 + (yy - 31) ** 2 + (xx - 33) ** 2 <= 14 ** 2] = 1  # on the grid's corner
    vol[2:12, 2:12, 20:31] = 2   # one voxel from object 3, which starts across the x = 32 face
    vol[2:12, 2:12, 32:44] = 3
    res, lab = blockwise(vol, tmp_path / "out.zarr", NO_FILTER, block=32)
    assert res.blocks == 8
    ball = lab[vol == 1]
    assert np.unique(ball[ball > 0]).size == 1 and (ball > 0).mean() > 0.9
    for i in (2, 3):
        part = lab[vol == i]
        assert np.unique(part[part > 0]).size == 1 and (part > 0).mean() > 0.9
    assert lab[5, 5, 25] != lab[5, 5, 40]  # near, on both sides of a face: two objects
    assert int(lab.max()) == 3
    assert np.array_equal(lab, in_memory(vol, NO_FILTER))


@pytest.mark.parametrize("block", [16, (32, 16, 24)])
def test_blockwise_equals_in_memory_on_ellipsoids(tmp_path, block):
    truth = ellipsoids((64, 80, 96), n=14, seed=3).astype(np.float32)
    params = VolumeParams(consensus=ConsensusParams(min_size=60, min_extent=3))
    res, lab = blockwise(truth, tmp_path / "out.zarr", params, block=block)
    assert res.blocks > 8
    assert np.array_equal(lab, in_memory(truth, params))
    # the table of the joined objects equals the table of the labels
    from nbapp.objects import object_table

    rows = object_table(lab)
    assert [(r["id"], r["voxels"], r["bbox"], r["centroid"]) for r in rows] == \
        [(r["id"], r["voxels"], r["bbox"], r["centroid"]) for r in res.table]


@pytest.mark.parametrize("block", [16, (32, 40, 56), 64])
def test_the_real_network_gives_the_in_memory_labels_at_any_block_size(tmp_path, block):
    """Issue 29: the default model standardises each image it is given and pools over all of
    it (the hard case for tiling). Blocks of 16 (objects cut into many pieces, pieces
    smaller than the model's input), uneven blocks, and blocks of 64 (the network saw
    96 x 96 pieces of these 128 x 128 slices before): every plane's stack and the labels are
    the in-memory ones, voxel for voxel."""
    from nbapp.engine import Engine
    from nbapp.samples import demo_volume
    from nbapp.volume import filter_stack

    vol = demo_volume()[0][8:40, 40:168, 60:188]  # 32 x 128 x 128
    engine = Engine("default", device="cpu", batch_size=4)
    params = VolumeParams(return_stacks=True)
    mem = drain(volume_steps(engine, vol, params))
    assert mem.labels.max() >= 5
    res = drain(blockwise_steps([engine], vol, tmp_path / "out.zarr", params,
                                BlockParams(block_size=block)))
    for plane in ("xy", "xz", "yz"):
        assert np.array_equal(np.asarray(res.stack(plane)[...]),
                              filter_stack(mem.stacks[plane], params.consensus))
    assert np.array_equal(np.asarray(res.labels()[...]), mem.labels)


def test_single_plane_blockwise_equals_in_memory(tmp_path):
    truth = ellipsoids((48, 64, 64), n=8, seed=5).astype(np.float32)
    params = VolumeParams(orthoplane=False, plane="xz",
                          consensus=ConsensusParams(min_size=30, min_extent=2))
    _, lab = blockwise(truth, tmp_path / "out.zarr", params, block=16)
    assert np.array_equal(lab, in_memory(truth, params))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mito_instance_fib1-3-2-1.tif", "mito_instance_fib1-0-0-0.tif"])
def test_blockwise_matches_in_memory_on_urocell(tmp_path, name):
    truth = tifffile.imread(data_path("urocell_mito_labels", name))[:128].astype(np.float32)
    params = VolumeParams()
    _, lab = blockwise(truth, tmp_path / "out.zarr", params, block=64)
    ref = in_memory(truth, params)
    assert f1_score(lab, ref) >= 0.99
    assert abs(int(lab.max()) - int(ref.max())) <= 1


@pytest.mark.slow
def test_blockwise_stacks_and_their_consensus_match_in_memory_on_urocell(tmp_path):
    """Per-plane stacks written block by block, then the consensus re-run from them block by
    block with other settings: the in-memory results, on real 3D instance labels."""
    from nbapp.blockwise import consensus_blockwise_steps
    from nbapp.volume import consensus, filter_stack

    truth = tifffile.imread(data_path("urocell_mito_labels", "mito_instance_fib1-3-2-1.tif")
                            )[:64].astype(np.float32)
    params = VolumeParams(return_stacks=True)
    res, _ = blockwise(truth, tmp_path / "out.zarr", params, block=64)
    mem = drain(volume_steps(LabelEngine(), truth, params))
    stacks = {p: res.stack(p) for p in ("xy", "xz", "yz")}
    for plane, stack in stacks.items():
        assert f1_score(np.asarray(stack[...]), filter_stack(mem.stacks[plane],
                                                             params.consensus)) >= 0.99
    cp = ConsensusParams(vote_threshold=3, min_size=2000)
    again = drain(consensus_blockwise_steps(stacks, tmp_path / "again.zarr", cp,
                                            BlockParams(block_size=64)))
    ref = consensus(mem.stacks, cp)
    assert f1_score(np.asarray(again.labels()[...]), ref) >= 0.99
    assert abs(again.objects - int(ref.max())) <= 1


def test_blockwise_stacks_equal_the_in_memory_stacks(tmp_path):
    from nbapp.volume import filter_stack

    truth = ellipsoids((48, 64, 80), n=10, seed=8).astype(np.float32)
    params = VolumeParams(return_stacks=True,
                          consensus=ConsensusParams(min_size=60, min_extent=3))
    res, lab = blockwise(truth, tmp_path / "out.zarr", params, block=16)
    mem = drain(volume_steps(LabelEngine(), truth, params))
    assert np.array_equal(lab, mem.labels)
    assert sorted(res.stacks) == ["xy", "xz", "yz"]
    assert [p.name for p in res.stacks.values()] == ["out_xy.zarr", "out_xz.zarr", "out_yz.zarr"]
    for plane in ("xy", "xz", "yz"):
        stack = np.asarray(res.stack(plane)[...])
        assert stack.max() > 3
        assert np.array_equal(stack, filter_stack(mem.stacks[plane], params.consensus))
    assert not WorkStore(tmp_path / "out.zarr").path.exists()
    # single plane: its one stack
    one = params.replace(orthoplane=False, plane="yz")
    res, _ = blockwise(truth, tmp_path / "one.zarr", one, block=16)
    assert list(res.stacks) == ["yz"]
    with pytest.raises(InputError, match="wrote no xy stack"):
        res.stack("xy")


def _disagreeing_views(seed=4):
    """Three per-plane stacks that disagree: xy sees two objects larger, xz misses some
    objects, yz misses others and sees one only in part, so the vote threshold and 'permit
    one stack' change the result."""
    from scipy import ndimage as ndi

    truth = ellipsoids((48, 64, 64), n=12, seed=seed)
    xy, xz, yz = truth.copy(), truth.copy(), truth.copy()
    for k in (1, 6):  # seen larger in xy alone: its rim has one vote
        xy[ndi.binary_dilation(truth == k, iterations=2) & (xy == 0)] = k
    xz[np.isin(xz, [2, 5, 9])] = 0
    yz[np.isin(yz, [2, 3, 7])] = 0
    yz[:, :, :30][yz[:, :, :30] == 4] = 0
    xz = np.where(xz > 0, xz + 100, 0)  # the views' ids need not agree
    return {"xy": xy, "xz": xz.astype(np.int32), "yz": yz}


@pytest.mark.parametrize("cp", [ConsensusParams(vote_threshold=1),
                                ConsensusParams(vote_threshold=2),
                                ConsensusParams(vote_threshold=3),
                                ConsensusParams(vote_threshold=1, allow_one_view=True),
                                ConsensusParams(vote_threshold=2, min_size=800, min_extent=4)])
def test_consensus_blockwise_equals_the_in_memory_consensus(tmp_path, cp):
    from nbapp.blockwise import consensus_blockwise_steps
    from nbapp.volume import consensus

    views = _disagreeing_views()
    ref = consensus(views, cp)
    res = drain(consensus_blockwise_steps(views, tmp_path / "c.zarr", cp,
                                          BlockParams(block_size=24)))
    assert res.blocks == 2 * 3 * 3
    assert np.array_equal(np.asarray(res.labels()[...]), ref)
    assert res.objects == int(ref.max()) == len(res.table)


def test_the_views_disagree_enough_for_the_consensus_test():
    from nbapp.volume import consensus

    views = _disagreeing_views()
    voxels = {v: int((consensus(views, ConsensusParams(vote_threshold=v)) > 0).sum())
              for v in (1, 2, 3)}
    assert voxels[1] > voxels[2] > voxels[3]
    one = ConsensusParams(vote_threshold=1)
    assert int(consensus(views, one.replace(allow_one_view=True)).max()) \
        == int(consensus(views, one).max()) + 1  # object 2, seen in xy alone


def test_consensus_blockwise_resumes_from_files(tmp_path):
    from nbapp.blockwise import VolumeSource, consensus_blockwise_steps
    from nbapp.io import write_labels
    from nbapp.volume import consensus

    views = _disagreeing_views(seed=5)
    paths = {p: write_labels(tmp_path / f"s_{p}.zarr", v) for p, v in views.items()}
    out = tmp_path / "c.zarr"

    def job():
        arrays = {p: read_image(path, lazy=True)[0] for p, path in paths.items()}
        return consensus_blockwise_steps(arrays, out, ConsensusParams(),
                                         BlockParams(block_size=32),
                                         sources={p: VolumeSource(str(v))
                                                  for p, v in paths.items()})

    _interrupted(job, after=2)
    assert not out.exists() and len(WorkStore(out).finished()) == 2
    assert len(WorkStore(out).stats_finished()) == 8  # every block counted before any written
    res = drain(job())
    assert res.skipped == 2 and res.blocks == 8
    assert np.array_equal(np.asarray(res.labels()[...]), consensus(views, ConsensusParams()))


@pytest.mark.parametrize("change, match", [
    (lambda v: v.pop("yz"), "missing \\['yz'\\]"),
    (lambda v: v.update(xz=v["xz"][:, :32]), "of one shape"),
    (lambda v: v.update(yz=v["yz"].astype(np.float32)), "integer labels"),
])
def test_consensus_blockwise_refuses_bad_stacks(tmp_path, change, match):
    from nbapp.blockwise import consensus_blockwise_steps

    views = _disagreeing_views()
    change(views)
    with pytest.raises(InputError, match=match):
        drain(consensus_blockwise_steps(views, tmp_path / "c.zarr"))
    assert not (tmp_path / "c.zarr").exists()


def test_consensus_blockwise_refuses_bad_outputs_and_workers(tmp_path):
    from nbapp.blockwise import consensus_blockwise_steps
    from nbapp.run3d import consensus_blockwise

    views = _disagreeing_views()
    with pytest.raises(InputError, match="ending in .zarr"):
        drain(consensus_blockwise_steps(views, tmp_path / "c.tif"))
    with pytest.raises(InputError, match="Dask workers read the stacks themselves"):
        drain(consensus_blockwise_steps(views, tmp_path / "c.zarr", client=object()))
    np.save(tmp_path / "xy.npy", views["xy"])
    with pytest.raises(InputError, match="all as files or all as arrays"):
        consensus_blockwise({"xy": tmp_path / "xy.npy", "xz": views["xz"], "yz": views["yz"]},
                            tmp_path / "c.zarr")
    with pytest.raises(InputError, match="must be ConsensusParams"):
        consensus_blockwise(views, tmp_path / "c.zarr", VolumeParams())


def test_reads_are_bounded_by_a_slab_of_whole_slices(tmp_path):
    """The volume is only ever read a slab of whole slices (with the median's neighbours) at a
    time, never whole, and the blocks read only the work store."""
    from nbapp.blockwise.plan import MAX_SLAB

    truth = ellipsoids((80, 72, 72), n=6, seed=2).astype(np.float32)
    reads = []

    class Watched:
        shape, dtype, ndim = truth.shape, truth.dtype, 3

        def __getitem__(self, index):
            out = truth[index]
            reads.append(out.shape)
            return out

    blockwise(Watched(), tmp_path / "out.zarr", NO_FILTER, block=16)
    largest = max(int(np.prod(s)) for s in reads)
    assert largest <= (MAX_SLAB + 2) * 80 * 72 < truth.size
    # every read of a box holds whole slices of some plane: two of its sides are the volume's
    # (the intensity range reads single slices)
    boxes = [s for s in reads if len(s) == 3]
    assert boxes and all(sum(a == b for a, b in zip(s, truth.shape)) >= 2 for s in boxes)


# -- output, resume, failure ----------------------------------------------------------------------

def test_output_is_ome_zarr_with_a_pyramid(tmp_path):
    import zarr

    truth = ellipsoids((32, 160, 160), n=6, seed=1).astype(np.float32)
    out = tmp_path / "out.zarr"
    blockwise(truth, out, NO_FILTER, block=80, voxel_size=(30.0, 5.0, 5.0))
    lab, meta = read_image(out, lazy=True)
    assert meta["format"] == "ome-zarr" and tuple(lab.shape) == truth.shape
    assert meta["voxel_size"] == (30.0, 5.0, 5.0)
    group = zarr.open_group(str(out), mode="r")
    levels = [d["path"] for d in group.attrs["ome"]["multiscales"][0]["datasets"]]
    assert len(levels) == 2
    half = group[levels[1]]
    assert half.shape == (16, 80, 80)  # nearest-neighbour level of half the size
    full = np.asarray(lab[...])
    assert any(np.array_equal(half[...], full[o::2, o::2, o::2]) for o in (0, 1))
    assert not list(tmp_path.glob(".*"))  # the work store and temporaries are gone
    assert [f["y"] for f in pyramid_factors((32, 160, 160))] == [2]


def _npy(tmp_path, volume):
    path = tmp_path / "vol.npy"
    np.save(path, volume)
    return path


def test_cancel_then_resume_skips_finished_blocks(tmp_path):
    truth = ellipsoids((32, 64, 64), n=8, seed=4).astype(np.float32)
    src = _npy(tmp_path, truth)
    out = tmp_path / "out.zarr"
    from nbapp.blockwise import VolumeSource

    def job(engine):
        vol = VolumeSource(str(src)).open()
        return blockwise_steps([engine], vol, out, NO_FILTER, BlockParams(block_size=16),
                               source=VolumeSource(str(src)))

    _interrupted(lambda: job(LabelEngine()), after=3)
    store = WorkStore(out)
    assert len(store.finished()) == 3 and not out.exists()
    assert len(store.slabs_finished()) == 5  # xy 1 slab of 32 slices, xz and yz 2 each
    engine = LabelEngine()
    res = drain(job(engine))
    assert res.skipped == 3 and res.blocks == 32
    assert res.slabs == res.slabs_skipped == 5 and engine.calls == 0  # no network again
    assert np.array_equal(np.asarray(res.labels()[...]), in_memory(truth, NO_FILTER))
    assert not store.path.exists()


def test_cancel_in_the_network_stage_then_resume_skips_finished_slabs(tmp_path):
    truth = ellipsoids((32, 64, 64), n=8, seed=4).astype(np.float32)
    src = _npy(tmp_path, truth)
    out = tmp_path / "out.zarr"
    from nbapp.blockwise import VolumeSource

    def job(engine):
        return blockwise_steps([engine], VolumeSource(str(src)).open(), out, NO_FILTER,
                               BlockParams(block_size=16), source=VolumeSource(str(src)))

    _interrupted(lambda: job(LabelEngine()), after=2, what="network")
    store = WorkStore(out)
    assert store.slabs_finished() == {("xy", 0), ("xz", 0)} and not store.finished()
    engine, fresh = LabelEngine(batch_size=1), LabelEngine(batch_size=1)
    res = drain(job(engine))
    assert res.skipped == 0 and res.slabs_skipped == 2 and res.slabs == 5
    drain(blockwise_steps([fresh], truth, tmp_path / "fresh.zarr", NO_FILTER,
                          BlockParams(block_size=16)))
    # the xy slab (32 slices) and the first xz slab (32 + 1 for the median) are not run again
    assert fresh.calls - engine.calls == 32 + 33
    assert np.array_equal(np.asarray(res.labels()[...]), in_memory(truth, NO_FILTER))


def test_other_settings_start_over(tmp_path):
    truth = ellipsoids((32, 64, 64), n=5, seed=6).astype(np.float32)
    src = _npy(tmp_path, truth)
    out = tmp_path / "out.zarr"
    from nbapp.blockwise import VolumeSource

    cancel = threading.Event()
    with pytest.raises(Cancelled):
        drain(blockwise_steps([LabelEngine()], truth, out, NO_FILTER,
                              BlockParams(block_size=16), source=VolumeSource(str(src))),
              lambda p: cancel.set() if p.done >= 2 else None, cancel)
    params = NO_FILTER.replace(median_size=1)
    res = drain(blockwise_steps([LabelEngine()], truth, out, params,
                                BlockParams(block_size=16), source=VolumeSource(str(src))))
    assert res.skipped == 0
    assert np.array_equal(np.asarray(res.labels()[...]), in_memory(truth, params))


def test_other_block_settings_reuse_the_network_outputs(tmp_path):
    """The per-slice labels do not depend on the blocks: a run with another block size
    or consensus reuses a kept work store's network outputs and redoes only the blocks."""
    truth = ellipsoids((32, 64, 64), n=8, seed=4).astype(np.float32)
    out = tmp_path / "out.zarr"
    first = drain(blockwise_steps([LabelEngine()], truth, out, NO_FILTER,
                                  BlockParams(block_size=16), keep_work=True))
    assert first.slabs == 5 and first.slabs_skipped == 0
    params = VolumeParams(consensus=ConsensusParams(vote_threshold=3, min_size=50))
    engine = LabelEngine()
    res, note = _first_note(lambda: blockwise_steps([engine], truth, out, params,
                                                    BlockParams(block_size=24),
                                                    keep_work=True))
    assert engine.calls == 0 and res.slabs_skipped == 5 and res.skipped == 0
    assert note == (f"the work store at {WorkStore(out).path} was made with other settings; "
                    "its network outputs are reused and the blocks start over")
    assert res.resumed_text() == (", the network outputs of 5 of 5 slabs of slices from an "
                                  "earlier run")
    assert np.array_equal(np.asarray(res.labels()[...]), in_memory(truth, params))


def _interrupted(job, after: int = 2, what: str = "block") -> None:
    """Run ``job()`` (a blockwise generator) until ``after`` blocks (``what="network"``:
    slabs) are finished, then cancel it."""
    cancel = threading.Event()
    done = []

    def progress(p):
        if p.stage == "network" and (p.detail or "").startswith(what) \
                and (p.detail or "").split(" · ")[0].endswith(" done"):
            done.append(p.detail)
        if len(done) >= after:
            cancel.set()

    with pytest.raises(Cancelled):
        drain(job(), progress, cancel)


def _first_note(job) -> tuple:
    """Run ``job()`` to its end; return (its result, the note of its reports)."""
    notes = []
    res = drain(job(), lambda p: notes.append(p.note) if getattr(p, "note", None) else None)
    assert len(notes) <= 1
    return res, (notes or [None])[0]


def test_a_changed_input_file_of_the_same_size_and_time_starts_fresh(tmp_path):
    """The input replaced by another file of the same size and modification time (cp -p,
    rsync -t): the job must not keep the old file's blocks."""
    from nbapp.blockwise import VolumeSource

    src = _npy(tmp_path, ellipsoids((32, 64, 64), n=8, seed=4).astype(np.float32))
    out = tmp_path / "out.zarr"

    def job():
        return blockwise_steps([LabelEngine()], VolumeSource(str(src)).open(), out, NO_FILTER,
                               BlockParams(block_size=16), source=VolumeSource(str(src)))

    _interrupted(job)
    st = src.stat()
    other = ellipsoids((32, 64, 64), n=8, seed=5).astype(np.float32)
    np.save(src, other)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (src.stat().st_size, src.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    res, note = _first_note(job)
    assert res.skipped == 0
    assert note == (f"the work store at {WorkStore(out).path} was made for another input "
                    "(vol.npy changed since); starting fresh")
    assert np.array_equal(np.asarray(res.labels()[...]), in_memory(other, NO_FILTER))


def test_an_array_changed_in_place_starts_fresh(tmp_path):
    """In-memory arrays are known by their values, not their address (which Python reuses)."""
    volume = ellipsoids((32, 64, 64), n=8, seed=4).astype(np.float32)
    out = tmp_path / "out.zarr"

    def job():
        return blockwise_steps([LabelEngine()], volume, out, NO_FILTER,
                               BlockParams(block_size=16))

    _interrupted(job)
    volume[:] = ellipsoids((32, 64, 64), n=8, seed=5)
    res, note = _first_note(job)
    assert res.skipped == 0
    assert "was made for another input (the array's values differ); starting fresh" in note
    assert np.array_equal(np.asarray(res.labels()[...]), in_memory(volume, NO_FILTER))


def test_an_unchanged_array_resumes(tmp_path):
    volume = ellipsoids((32, 64, 64), n=8, seed=4).astype(np.float32)
    out = tmp_path / "out.zarr"
    engines = []

    def job():
        engines.append(LabelEngine())
        return blockwise_steps(engines[-1:], volume.copy(), out, NO_FILTER,
                               BlockParams(block_size=16))

    _interrupted(job, after=3)
    res, note = _first_note(job)
    assert res.skipped == 3 and res.blocks == 32 and note is None
    fresh = LabelEngine()
    drain(blockwise_steps([fresh], volume, tmp_path / "fresh.zarr", NO_FILTER,
                          BlockParams(block_size=16)))
    assert engines[-1].calls == 0 < fresh.calls  # the network outputs were all kept
    assert np.array_equal(np.asarray(res.labels()[...]), in_memory(volume, NO_FILTER))


def _script(path, seed: int) -> None:
    import torch

    from models import TinyNet

    torch.jit.script(TinyNet(seed=seed)).save(str(path))


def test_cli_resume_with_another_model_starts_fresh(tmp_path, capsys):
    """Start a job with m.pt, stop it, replace m.pt by another model, run the same command:
    the blocks of the first model must not be kept (they were: the store knew the model by
    its name and path)."""
    from nbapp.cli import main
    from nbapp.run3d import segment_blockwise
    from nbapp.samples import demo_volume

    vol = tmp_path / "vol.npy"
    np.save(vol, demo_volume()[0][:40, 40:112, 40:112])
    model = tmp_path / "m.pt"
    out = tmp_path / "out.zarr"
    blocks = BlockParams(block_size=(40, 36, 36))
    _script(model, seed=0)
    _interrupted(lambda: _blockwise_job(segment_blockwise, vol, out, model, blocks))
    _script(model, seed=4)  # random models of seeds 0 and 4 find 19 and 5 objects here
    args = ["segment", vol, "-o", out, "--mode", "3d", "--model", model, "--block-size",
            "40,36,36", "--min-size", "0", "--min-extent", "0"]
    assert main([str(a) for a in args]) == 0
    err = capsys.readouterr().err
    assert (f"nbapp: the work store at {WorkStore(out).path} was made with another model "
            "(m, content ") in err and "; starting fresh" in err
    assert "from an earlier run" not in err
    fresh = segment_blockwise(str(vol), tmp_path / "fresh.zarr", str(model), NO_FILTER, blocks,
                              devices="cpu")
    _script(tmp_path / "m0.pt", seed=0)
    first = segment_blockwise(str(vol), tmp_path / "first.zarr", str(tmp_path / "m0.pt"),
                              NO_FILTER, blocks, devices="cpu")
    got = np.asarray(read_image(out, lazy=True)[0][...])
    assert np.array_equal(got, _labels(fresh))
    assert not np.array_equal(_labels(first), _labels(fresh))  # the probe can tell them apart


def _blockwise_job(segment_blockwise, vol, out, model, blocks):
    """segment_blockwise's job as a generator (so that _interrupted can stop it)."""
    from nbapp.blockwise import VolumeSource
    from nbapp.run3d import make_engines

    source = VolumeSource(str(vol))
    return blockwise_steps(make_engines(str(model), "cpu"), source.open(), out, NO_FILTER,
                           blocks, model=str(model), source=source)


def test_model_identity_is_the_content(tmp_path, monkeypatch):
    """A model file is hashed once per version (not once per block or job); a model held in
    memory is known by its parameters."""
    import torch

    from models import TinyNet
    from nbapp import cluster
    from nbapp.models import load_model

    path = tmp_path / "m.pt"
    _script(path, seed=0)
    expected = cluster.hashlib.sha256(path.read_bytes()).hexdigest()
    reads = []
    real = cluster.hashlib.sha256
    monkeypatch.setattr(cluster.hashlib, "sha256", lambda *a: reads.append(1) or real(*a))
    model = load_model(str(path), device="cpu", warm_up=False)
    first = cluster.model_identity(model)
    assert cluster.model_identity(model) == first and len(reads) == 1
    assert first == {"name": "m", "weights": expected}
    _script(path, seed=4)
    assert cluster.model_identity(model)["weights"] != first["weights"] and len(reads) == 2

    def in_memory_model(seed):
        return cluster.model_identity(load_model(TinyNet(seed=seed), device="cpu",
                                                 warm_up=False))

    assert in_memory_model(0) == in_memory_model(0) != in_memory_model(4)
    assert "weights" in in_memory_model(0)
    assert cluster.model_identity(torch.nn.Linear(2, 2))["name"] == "Linear"


def test_a_worker_refuses_a_model_file_changed_since_the_job_started(tmp_path):
    from nbapp.cluster import file_digest, worker_engine

    path = tmp_path / "m.pt"
    _script(path, seed=0)
    digest = file_digest(path)
    old = worker_engine(str(path), 2, "cpu", digest)
    _script(path, seed=4)
    # a worker that lives on between jobs loads the new file for a job of the new file
    assert worker_engine(str(path), 2, "cpu", file_digest(path)) is not old
    # a worker that starts after the file changed refuses to run a job of the old one
    worker_engine.cache_clear()
    with pytest.raises(InputError, match=r"the model '.*m.pt' changed after the job started "
                                         r"\(content [0-9a-f]{12}, now [0-9a-f]{12}\): run "
                                         r"the job again"):
        worker_engine(str(path), 2, "cpu", digest)


def test_a_failing_slab_fails_the_job_and_keeps_the_store_consistent(tmp_path):
    truth = ellipsoids((32, 64, 64), n=5, seed=7).astype(np.float32)
    out = tmp_path / "out.zarr"

    class Failing(LabelEngine):
        def infer(self, images, *a, **k):
            if self.calls >= 20:  # in the second xz slab (xy: 8 batches, first xz slab: 9)
                raise RuntimeError("device lost")
            return super().infer(images, *a, **k)

    with pytest.raises(RuntimeError, match="device lost"):
        drain(blockwise_steps([Failing()], truth, out, NO_FILTER,
                              BlockParams(block_size=16)))
    assert not out.exists()
    store = WorkStore(out)
    assert store.slabs_finished() == {("xy", 0), ("xz", 0)} and not store.finished()
    assert np.asarray(store.raw("xz")[:, :32]).any()  # written, the unfinished slab untouched
    assert not np.asarray(store.raw("xz")[:, 32:]).any()


def test_a_failing_block_fails_the_job_and_keeps_the_store_consistent(tmp_path, monkeypatch):
    import nbapp.blockwise.workers as workers

    truth = ellipsoids((32, 64, 64), n=5, seed=7).astype(np.float32)
    out = tmp_path / "out.zarr"
    calls = []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) > 5:  # the sixth block
            raise RuntimeError("worker lost")
        return write_block(*a, **k)

    write_block = workers.write_block
    monkeypatch.setattr(workers, "write_block", failing)
    with pytest.raises(RuntimeError, match="worker lost"):
        drain(blockwise_steps([LabelEngine()], truth, out, NO_FILTER,
                              BlockParams(block_size=16)))
    assert not out.exists()
    store = WorkStore(out)
    done = store.finished()
    assert done == set(range(5))
    labels = store.labels()
    written = []
    for b in store.attach(store.path).grid:  # finished blocks written, the others untouched
        core = np.asarray(labels[tuple(slice(lo, hi) for lo, hi in b.core)])
        if b.index not in done:
            assert not core.any()
        elif core.any():
            written.append(b.index)
    assert written


# -- parameters and errors -------------------------------------------------------------------------

def test_block_size_from_the_memory_budget(monkeypatch):
    import nbapp.memory

    assert choose_block_size((1000, 4000, 4000), VolumeParams(),
                             BlockParams(memory_budget=1200 << 20)) == (224, 224, 224)
    monkeypatch.setattr(nbapp.memory, "available_bytes", lambda: 64 << 30)
    assert choose_block_size((1000, 4000, 4000), VolumeParams()) == (224, 224, 224)
    monkeypatch.setattr(nbapp.memory, "available_bytes", lambda: 1 << 30)  # a small container
    assert choose_block_size((1000, 4000, 4000), VolumeParams())[0] < 224
    small = choose_block_size((1000, 4000, 4000), VolumeParams(),
                              BlockParams(memory_budget=256 << 20))
    assert small[0] < 224 and small[0] % 16 == 0
    assert choose_block_size((40, 4000, 4000), VolumeParams(), BlockParams(block_size=(8, 64, 64))) \
        == (8, 64, 64)


@pytest.mark.parametrize("kw, match", [
    ({"block_size": 4}, "block_size"),
    ({"block_size": (8, 8)}, "block_size"),
    ({"memory_budget": 1000}, "memory_budget"),
])
def test_bad_block_params(kw, match):
    with pytest.raises(ParameterError, match=match):
        BlockParams(**kw)


def test_bad_jobs_are_refused_before_any_work(tmp_path):
    vol = np.zeros((32, 32, 32), np.float32)
    engine = LabelEngine()
    with pytest.raises(InputError, match=".zarr"):
        drain(blockwise_steps([engine], vol, tmp_path / "out.tif", NO_FILTER))
    with pytest.raises(InputError, match="does not exist"):
        drain(blockwise_steps([engine], vol, tmp_path / "no" / "out.zarr", NO_FILTER))
    with pytest.raises(InputError, match="file"):
        drain(blockwise_steps([engine], vol, tmp_path / "out.zarr", NO_FILTER, workers="processes"))
    with pytest.raises(InputError, match="threads"):
        drain(blockwise_steps([engine], vol, tmp_path / "out.zarr", NO_FILTER, workers="gpu"))
    assert engine.calls == 0 and not list(tmp_path.iterdir())


def test_semantic_only_blockwise_is_the_voxel_vote(tmp_path):
    from nbapp.params import SliceParams

    truth = ellipsoids((32, 48, 48), n=5, seed=2).astype(np.float32)
    params = VolumeParams(slice=SliceParams(semantic_only=True, label_divisor=0), median_size=1)
    _, lab = blockwise(truth, tmp_path / "out.zarr", params, block=16)
    assert np.array_equal(lab, in_memory(truth, params))
    assert np.array_equal(lab, (truth > 0).astype(np.int32))


# -- workers: processes and a Dask cluster ---------------------------------------------------------

@pytest.fixture
def tiny_volume(tmp_path):
    """A crop of the demo volume (file) and the default model: real objects, a few seconds."""
    from nbapp.samples import demo_volume

    vol = demo_volume()[0][:40, 40:112, 40:112]
    np.save(tmp_path / "vol.npy", vol)
    return str(tmp_path / "vol.npy"), "default"


def _labels(result):
    return np.asarray(result.labels()[...])


@pytest.mark.slow
def test_worker_processes_give_the_threads_labels(tmp_path, tiny_volume):
    from nbapp.run3d import segment_blockwise

    vol, model = tiny_volume
    params = VolumeParams(consensus=ConsensusParams(min_size=0, min_extent=0))
    blocks = BlockParams(block_size=(40, 36, 36))
    local = segment_blockwise(vol, tmp_path / "a.zarr", model, params, blocks, devices="cpu")
    procs = segment_blockwise(vol, tmp_path / "b.zarr", model, params, blocks,
                              devices="cpu,cpu", workers="processes")
    assert local.blocks == procs.blocks == 4
    assert local.objects > 0
    np.testing.assert_array_equal(_labels(local), _labels(procs))


@pytest.mark.slow
def test_dask_cluster_of_two_workers_gives_the_local_labels(tmp_path, tiny_volume):
    distributed = pytest.importorskip("distributed")
    from nbapp.run3d import segment_blockwise

    from nbapp.run3d import consensus_blockwise

    vol, model = tiny_volume
    params = VolumeParams(consensus=ConsensusParams(min_size=0, min_extent=0),
                          return_stacks=True)
    blocks = BlockParams(block_size=(40, 36, 36))
    local = segment_blockwise(vol, tmp_path / "a.zarr", model, params, blocks, devices="cpu")
    vote3 = ConsensusParams(vote_threshold=3, min_size=0, min_extent=0)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        remote = segment_blockwise(vol, tmp_path / "b.zarr", model, params, blocks,
                                   devices="cpu", client=client)
        assert len(client.scheduler_info()["workers"]) == 2
        # the consensus again from the stored stacks, one Dask task per block
        again = consensus_blockwise(remote.stacks, tmp_path / "c.zarr", vote3,
                                    BlockParams(block_size=(40, 36, 36)), client=client)
    np.testing.assert_array_equal(_labels(local), _labels(remote))
    assert remote.table == local.table
    for plane in ("xy", "xz", "yz"):
        np.testing.assert_array_equal(np.asarray(local.stack(plane)[...]),
                                      np.asarray(remote.stack(plane)[...]))
    here = consensus_blockwise(local.stacks, tmp_path / "d.zarr", vote3,
                               BlockParams(block_size=(40, 36, 36)))
    np.testing.assert_array_equal(_labels(again), _labels(here))
    assert 0 < here.objects <= local.objects


# -- the command line ------------------------------------------------------------------------------

def test_cli_blockwise_with_table_and_resume(tmp_path, tiny_volume, capsys):
    import csv

    from nbapp.cli import main
    from nbapp.run3d import segment_blockwise

    vol, model = tiny_volume
    out = tmp_path / "out.zarr"
    args = ["segment", vol, "-o", str(out), "--mode", "3d", "--model", model,
            "--block-size", "40,36,36", "--min-size", "0", "--min-extent", "0",
            "--table", str(tmp_path / "objects.csv")]
    # an interrupted earlier run of the same job: three blocks finished
    cancel = threading.Event()
    params = VolumeParams(consensus=ConsensusParams(min_size=0, min_extent=0))
    with pytest.raises(Cancelled):
        segment_blockwise(vol, out, model, params, BlockParams(block_size=(40, 36, 36)),
                          devices="cpu", cancel=cancel,
                          progress=lambda p: cancel.set()
                          if (p.detail or "").startswith("block 2/4 done") else None)
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "2 of them from an earlier run" in err and "4 blocks" in err
    lab = np.asarray(read_image(out, lazy=True)[0][...])
    with open(tmp_path / "objects.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == int(lab.max()) > 0
    first = rows[0]
    assert int(first["voxels"]) == int((lab == int(first["id"])).sum())


@pytest.mark.slow
def test_cli_blockwise_stacks_then_consensus_out_of_core(tmp_path, tiny_volume, capsys,
                                                         monkeypatch):
    """--return-stacks on a blockwise run writes OUT_xy/xz/yz.zarr; `nbapp consensus` re-runs
    from them block by block (asked for, or by itself when memory is short) and gives the
    in-memory consensus of the same stacks."""
    import nbapp.memory
    from nbapp.cli import main
    from nbapp.volume import consensus

    vol, model = tiny_volume
    out = tmp_path / "out.zarr"
    assert main(["segment", vol, "-o", str(out), "--mode", "3d", "--model", model,
                 "--block-size", "40,36,36", "--return-stacks"]) == 0
    err = capsys.readouterr().err
    assert "xy/xz/yz stacks (out_xy.zarr, out_xz.zarr, out_yz.zarr)" in err
    stacks = [str(tmp_path / f"out_{p}.zarr") for p in ("xy", "xz", "yz")]
    arrays = {p: np.asarray(read_image(s)[0]) for p, s in zip(("xy", "xz", "yz"), stacks)}
    ref = consensus(arrays, ConsensusParams(vote_threshold=3))
    assert main(["consensus", *stacks, "-o", str(tmp_path / "c.zarr"), "--vote", "3",
                 "--block-size", "20,36,36"]) == 0
    assert "8 blocks" in capsys.readouterr().err
    got = np.asarray(read_image(tmp_path / "c.zarr")[0])
    assert f1_score(got, ref) >= 0.99 and int(ref.max()) > 0
    # too large for memory: a .tif output is refused with the way out, a .zarr one runs
    monkeypatch.setattr(nbapp.memory, "available_bytes", lambda: 1 << 20)
    assert main(["consensus", *stacks, "-o", str(tmp_path / "c.tif")]) == 1
    err = capsys.readouterr().err
    assert "out of memory: the consensus of 40x72x72 stacks" in err and "write to a .zarr" in err
    assert not (tmp_path / "c.tif").exists()
    monkeypatch.undo()
    import nbapp.blockwise as bw
    monkeypatch.setattr(bw, "default_budget", lambda: 64 << 20)
    monkeypatch.setattr(nbapp.memory, "available_bytes", lambda: 1 << 20)
    assert main(["consensus", *stacks, "-o", str(tmp_path / "e.zarr")]) == 0
    err = capsys.readouterr().err
    assert "block by block" in err
    monkeypatch.undo()
    assert f1_score(np.asarray(read_image(tmp_path / "e.zarr")[0]), consensus(
        arrays, ConsensusParams())) >= 0.99


def test_cli_consensus_refuses_a_blockwise_tif(tmp_path, capsys):
    from nbapp.cli import main
    from nbapp.io import write_labels

    views = _disagreeing_views()
    stacks = [str(write_labels(tmp_path / f"s_{p}.tif", v)) for p, v in views.items()]
    assert main(["consensus", *stacks, "-o", str(tmp_path / "c.tif"), "--blockwise"]) == 2
    err = capsys.readouterr().err
    assert "blockwise consensus writes OME-Zarr" in err
    assert not (tmp_path / "c.tif").exists()


def test_cli_runs_blockwise_by_itself_when_memory_is_short(tmp_path, tiny_volume, capsys,
                                                           monkeypatch):
    import nbapp.blockwise as bw
    from nbapp.cli import main

    vol, model = tiny_volume
    monkeypatch.setattr(bw, "needs_blockwise", lambda *a, **k: True)
    code = main(["segment", vol, "-o", str(tmp_path / "out.tif"), "--mode", "3d", "--model", model])
    err = capsys.readouterr().err
    assert code == 1 and "out of memory: the ortho-plane 3D job on a 40x72x72" in err
    assert "write to a .zarr output" in err
    assert main(["segment", vol, "-o", str(tmp_path / "out.zarr"), "--mode", "3d",
                 "--model", model]) == 0
    err = capsys.readouterr().err
    assert "block by block" in err and "OME-Zarr" in err


@pytest.mark.parametrize("extra, message", [
    (["--block-size", "4"], "block_size"),
    (["--block-size", "a,b"], "not a block size"),
])
def test_cli_bad_blockwise_options(tmp_path, tiny_volume, capsys, extra, message):
    from nbapp.cli import main

    vol, model = tiny_volume
    code = main(["segment", vol, "-o", str(tmp_path / "out.zarr"), "--mode", "3d",
                 "--model", model, *extra])
    assert code != 0 and message in capsys.readouterr().err
    assert not (tmp_path / "out.zarr").exists()


def test_cli_halo_is_accepted_and_said_to_be_unused(tmp_path, tiny_volume, capsys):
    from nbapp.cli import main

    vol, model = tiny_volume
    assert main(["segment", vol, "-o", str(tmp_path / "out.zarr"), "--mode", "3d", "--model",
                 model, "--block-size", "40,36,36", "--halo", "8"]) == 0
    assert "--halo is no longer used" in capsys.readouterr().err


def test_a_second_live_run_on_the_same_output_is_refused(tmp_path):
    import os
    import socket

    out = tmp_path / "out.zarr"
    lock = tmp_path / ".out.zarr.nbapp-work.lock"
    lock.write_text(f"{socket.gethostname()} {os.getppid()}")  # a live process of this host
    vol = np.zeros((32, 32, 32), np.float32)
    with pytest.raises(InputError, match="another nbapp run"):
        drain(blockwise_steps([LabelEngine()], vol, out, NO_FILTER))
    lock.write_text(f"{socket.gethostname()} 999999999")  # a dead one: taken over
    res = drain(blockwise_steps([LabelEngine()], vol, out, NO_FILTER))
    assert res.objects == 0 and not lock.exists()


@pytest.mark.slow
def test_a_killed_run_resumes(tmp_path, tiny_volume):
    """kill -9 in the middle of a blockwise run: the same command again skips the finished
    slabs (the dead run's lock is taken over) and gives the labels of an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    vol, model = tiny_volume
    out = tmp_path / "out.zarr"
    args = [sys.executable, "-m", "nbapp.cli", "segment", vol, "-o", str(out), "--mode", "3d",
            "--model", model, "--block-size", "40,36,36"]
    log = open(tmp_path / "killed.log", "wb")
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log)
    slabs = tmp_path / ".out.zarr.nbapp-work" / "slabs"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if slabs.exists() and any(slabs.glob("*.done")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    records = [p for p in (slabs.parent / "records").glob("*.npz") if p.stem.isdigit()]
    done = len(list(slabs.glob("*.done")))
    assert done >= 1 and not out.exists()
    again = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (f"{len(records)} of them from an earlier run" if records
            else f"the network outputs of {done} of") in again.stderr
    fresh = tmp_path / "fresh.zarr"
    subprocess.run([*args[:6], str(fresh), *args[7:]], check=True, capture_output=True)
    np.testing.assert_array_equal(np.asarray(read_image(out, lazy=True)[0][...]),
                                  np.asarray(read_image(fresh, lazy=True)[0][...]))


class _ThreadsTask:
    """A block task that reports the worker process's device and torch threads."""

    def run(self, part: tuple) -> dict:
        import torch

        from nbapp.blockwise.workers import _DEVICE

        return {"index": part[1], "device": _DEVICE[0], "threads": torch.get_num_threads()}


@pytest.mark.parametrize("cores, devices, threads", [(4, ["cpu", "cpu"], 2), (2, ["cpu"] * 3, 1)])
def test_worker_processes_share_the_cores(monkeypatch, cores, devices, threads):
    """Each worker process started one torch thread per core: two processes on two cores took
    48 s for what one process did in 4 s (tiny_volume's job). They now share the cores."""
    from nbapp.blockwise.workers import _process_parts

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    todo = [("block", i) for i in range(len(devices))]
    runs = list(_process_parts(_ThreadsTask(), todo, devices))
    assert sorted(part for part, _ in runs) == todo
    out = [o for _, o in runs]
    assert sorted(o["index"] for o in out) == list(range(len(devices)))
    assert {o["threads"] for o in out} == {threads} and {o["device"] for o in out} == {"cpu"}


@pytest.mark.parametrize("plane", ["xy", "xz", "yz"])
def test_tracking_a_slice_at_a_time_is_track_plane_with_two_classes(tmp_path, plane):
    """The tracking stage links whole slices one at a time, each thing class on its own: the
    in-memory track_plane's objects, numbered alike after relabelling by first appearance."""
    from nbapp.blockwise.tracks import run_tracking
    from nbapp.tracking import relabel_by_first_appearance
    from nbapp.volume import _SLICE_DIVISOR, plane_axis, track_plane

    truth = ellipsoids((24, 40, 48), n=10, seed=3)
    ax = plane_axis(plane)
    raw = np.zeros(truth.shape, np.int32)  # per-slice ids as the network stage writes them
    for i in range(truth.shape[ax]):
        index = tuple(i if a == ax else slice(None) for a in range(3))
        sl = truth[index]
        cls = np.where(sl % 2 == 0, 2, 1)  # even objects are of the second class
        raw[index] = np.where(sl > 0, cls * _SLICE_DIVISOR + sl + i, 0)
    store = WorkStore(tmp_path / "out.zarr")
    store.open({"t": 1}, truth.shape, (8, 8, 8), network={"n": 1}, thickness={plane: 7})
    for k in range(len(store.slabs[plane])):
        store.write_slab(plane, k, raw[tuple(slice(*b) for b in store.slab_box(plane, k))])
    run_tracking(store, plane, (1, 2))
    got = np.asarray(store.tracked(plane)[...])
    assert plane in store.tracks_finished() and not (store.path / f"fwd_{plane}.zarr").exists()
    assert got.max() < 1000  # small ids, each class after the other
    want = track_plane(raw, plane, (1, 2))
    assert np.array_equal(relabel_by_first_appearance(got), want)
    assert want.max() >= 5
