"""3D inference: per-plane stacks, median, tracking, consensus, devices, progress and cancel."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from models import data_path
from models import LabelEngine, TinyNet, ellipsoids

from nbapp import InputError, ParameterError
from nbapp.jobs import DevicePool, JobRunner, JobState
from nbapp.metrics import instance_metrics
from nbapp.params import ConsensusParams, SliceParams, VolumeParams
from nbapp.run3d import segment_volume
from nbapp.volume import Cancelled, consensus, get_slice, median_window, volume_steps

SMALL = ConsensusParams(min_size=20, min_extent=2)


def run(engine, volume, params, **kw):
    gen = volume_steps(engine, volume, params, intensity=(0.0, 1.0, "labels"), **kw)
    progress = []
    while True:
        try:
            progress.append(next(gen))
        except StopIteration as stop:
            return stop.value, progress


def test_get_slice_planes():
    vol = np.arange(24).reshape(2, 3, 4)
    assert get_slice(vol, "xy", 1).shape == (3, 4)
    assert get_slice(vol, "xz", 2).tolist() == vol[:, 2, :].tolist()
    assert get_slice(vol, "yz", 3).tolist() == vol[:, :, 3].tolist()
    with pytest.raises(InputError, match="unknown plane"):
        get_slice(vol, "zz", 0)


def test_median_is_centred_and_edges_use_the_shorter_window():
    probs = [np.full((1, 1, 1), v, np.float32) for v in (0.9, 0.1, 0.8, 0.2, 0.7)]
    assert median_window(probs[0:3]).item() == pytest.approx(0.8)
    assert median_window(probs[0:2]).item() == pytest.approx(0.5)  # edge: 2 slices available
    assert median_window(probs).item() == pytest.approx(0.7)


@pytest.mark.parametrize("plane", ["xy", "xz", "yz"])
def test_single_plane_recovers_objects(plane):
    truth = ellipsoids()
    res, progress = run(LabelEngine(), truth.astype(np.float32),
                        VolumeParams(plane=plane, orthoplane=False, median_size=1, consensus=SMALL))
    assert res.labels.shape == truth.shape and res.labels.dtype == np.int32
    assert instance_metrics(res.labels, truth)["f1"] == 1.0
    assert sorted(np.unique(res.labels))[1:] == list(range(1, truth.max() + 1))
    n = truth.shape[["xy", "xz", "yz"].index(plane)]
    assert [p.done for p in progress if p.stage == "network"] == list(range(1, n + 1))
    assert progress[-1].stage == "tracking"


def test_orthoplane_consensus_and_rerun_from_stacks():
    truth = ellipsoids(seed=3)
    params = VolumeParams(median_size=3, consensus=SMALL, return_stacks=True)
    res, progress = run(LabelEngine(), truth.astype(np.float32), params)
    assert set(res.stacks) == {"xy", "xz", "yz"}
    assert instance_metrics(res.labels, truth)["f1"] == 1.0
    assert {p.plane for p in progress} == {"xy", "xz", "yz", "all"}
    again = consensus(res.stacks, SMALL)
    np.testing.assert_array_equal(again, res.labels)  # re-run == full run with the same settings
    strict = consensus(res.stacks, SMALL.replace(min_size=10**6))
    assert not strict.any()


def test_two_workers_give_the_same_labels_as_one():
    truth = ellipsoids(seed=5)
    params = VolumeParams(orthoplane=False, consensus=SMALL)
    one, _ = run(LabelEngine(), truth.astype(np.float32), params)
    engines = [LabelEngine(batch_size=3), LabelEngine(batch_size=3)]
    two, _ = run(engines[0], truth.astype(np.float32), params, heads_source=DevicePool(engines))
    np.testing.assert_array_equal(one.labels, two.labels)
    assert engines[0].calls > 0 and engines[1].calls > 0  # both devices did work


def test_segment_volume_with_a_real_model_on_two_cpu_workers():
    rng = np.random.default_rng(0)
    vol = (rng.random((20, 32, 48)) * 255).astype(np.uint8)
    model = torch.jit.script(TinyNet())
    params = VolumeParams(orthoplane=False, slice=SliceParams(seg_threshold=0.5),
                          consensus=ConsensusParams(min_size=0, min_extent=0))
    a = segment_volume(vol, model, params, devices=["cpu"])
    b = segment_volume(vol, model, params, devices="cpu,cpu")
    np.testing.assert_array_equal(a, b)
    labels, stacks = segment_volume(vol, model, params.replace(return_stacks=True), devices=["cpu"])
    np.testing.assert_array_equal(labels, a)
    assert list(stacks) == ["xy"]


def test_progress_callback_and_cancel():
    truth = ellipsoids()
    cancel = threading.Event()
    seen = []

    def progress(p):
        seen.append(p)
        if len(seen) == 3:
            cancel.set()

    with pytest.raises(Cancelled):
        segment_volume(truth.astype(np.float32), torch.jit.script(TinyNet()),
                       VolumeParams(orthoplane=False), devices=["cpu"], progress=progress,
                       cancel=cancel)
    assert len(seen) == 3


def test_job_runner_runs_a_volume_job_in_the_background():
    truth = ellipsoids(seed=1)
    runner = JobRunner()
    params = VolumeParams(consensus=SMALL)
    runner.submit(lambda: volume_steps(LabelEngine(), truth.astype(np.float32), params,
                                       intensity=(0.0, 1.0)))
    snap = runner.wait(60)
    assert snap.state == JobState.DONE, snap.error
    assert instance_metrics(snap.result.labels, truth)["f1"] == 1.0
    assert set(snap.planes) == {"xy", "xz", "yz", "all"}


@pytest.mark.parametrize("volume, params, message", [
    (np.zeros((32, 32), np.float32), VolumeParams(), r"volume \(Z, Y, X\)"),
    (np.zeros((0, 32, 32), np.float32), VolumeParams(), "empty"),
])
def test_bad_volumes(volume, params, message):
    with pytest.raises(InputError, match=message):
        run(LabelEngine(), volume, params)


@pytest.mark.parametrize("kw, message", [
    ({"median_size": 4}, "median_size must be an odd number"),
    ({"median_size": 13}, "median_size"),
    ({"plane": "zx"}, "plane must be one of"),
    ({"orthoplane": 1}, "orthoplane must be True or False"),
])
def test_bad_volume_params(kw, message):
    with pytest.raises(ParameterError, match=message):
        VolumeParams(**kw)


@pytest.mark.parametrize("kw, message", [
    ({"vote_threshold": 0}, "vote_threshold"), ({"vote_threshold": 4}, "vote_threshold"),
    ({"min_size": -1}, "min_size"), ({"min_extent": 1001}, "min_extent"),
])
def test_bad_consensus_params(kw, message):
    with pytest.raises(ParameterError, match=message):
        ConsensusParams(**kw)


@pytest.mark.slow
def test_real_3d_labels_single_and_orthoplane():
    import tifffile

    truth = tifffile.imread(data_path("urocell_mito_labels", "mito_instance_fib1-0-0-0.tif"))
    truth = truth[:128, :128, :128].astype(np.int32)
    vol = truth.astype(np.float32)
    params = VolumeParams(consensus=ConsensusParams(min_size=100, min_extent=3))
    single, _ = run(LabelEngine(batch_size=8), vol, params.replace(orthoplane=False))
    ortho, _ = run(LabelEngine(batch_size=8), vol, params)
    sizes = np.bincount(truth.ravel())
    big = np.where(sizes[truth] >= 100, truth, 0)
    f_single = instance_metrics(single.labels, big)["f1"]
    f_ortho = instance_metrics(ortho.labels, big)["f1"]
    print(f"UroCell 128^3 label oracle: single-plane F1@0.5 {f_single:.3f}, ortho-plane {f_ortho:.3f}")
    assert f_single >= 0.9 and f_ortho >= 0.9


@pytest.fixture
def tiny_file(tmp_path):
    path = tmp_path / "tiny.pt"
    torch.jit.script(TinyNet(seed=3)).save(str(path))
    return str(path)


@pytest.mark.slow
def test_dask_cluster_with_two_workers_matches_the_local_run(tiny_file):
    distributed = pytest.importorskip("distributed")
    rng = np.random.default_rng(2)
    vol = (rng.random((24, 32, 40)) * 255).astype(np.uint8)
    params = VolumeParams(median_size=5, consensus=ConsensusParams(min_size=0, min_extent=0),
                          return_stacks=True)
    local, local_stacks = segment_volume(vol, tiny_file, params, devices=["cpu"])
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        remote, remote_stacks = segment_volume(vol, tiny_file, params, devices=["cpu"], client=client)
        assert len(client.scheduler_info()["workers"]) == 2
    np.testing.assert_array_equal(local, remote)
    for p in ("xy", "xz", "yz"):
        np.testing.assert_array_equal(local_stacks[p], remote_stacks[p])


def test_dask_needs_a_model_file():
    from nbapp.cluster import model_spec_for_workers

    with pytest.raises(InputError, match="model file"):
        model_spec_for_workers(TinyNet())
    assert model_spec_for_workers("default") == "default"


@pytest.mark.parametrize("orthoplane", [False, True])
def test_semantic_only_3d_is_a_voxel_vote(orthoplane):
    truth = ellipsoids(seed=2)
    sp = SliceParams(semantic_only=True, label_divisor=0)
    res, _ = run(LabelEngine(), truth.astype(np.float32),
                 VolumeParams(slice=sp, orthoplane=orthoplane, median_size=1))
    np.testing.assert_array_equal(res.labels, (truth > 0).astype(np.int32))
    res, _ = run(LabelEngine(), truth.astype(np.float32),
                 VolumeParams(slice=sp.replace(label_divisor=1000), orthoplane=orthoplane, median_size=1))
    assert set(np.unique(res.labels)) == {0, 1000}


def test_rerun_consensus_with_lower_min_size_equals_a_full_run():
    truth = ellipsoids(seed=4, n=6)
    strict = VolumeParams(consensus=ConsensusParams(min_size=10**5, min_extent=2))
    loose = VolumeParams(consensus=ConsensusParams(min_size=20, min_extent=2))
    res, _ = run(LabelEngine(), truth.astype(np.float32), strict)
    assert not res.labels.any()  # everything was filtered out in the job
    full, _ = run(LabelEngine(), truth.astype(np.float32), loose)
    np.testing.assert_array_equal(consensus(res.stacks, loose.consensus), full.labels)
    assert full.labels.max() == truth.max()
