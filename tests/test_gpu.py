"""CUDA checks: the same results on a GPU as on the CPU, and a GPU + CPU job split across
devices. Skipped where torch sees no CUDA device (CI); run them with ``pytest -m gpu``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import f1_score

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def demo():
    from nbapp.samples import demo_volume

    return demo_volume()


def test_default_model_loads_on_cuda_and_matches_cpu(demo):
    from nbapp.inference import SliceSegmenter
    from nbapp.models import load_model
    from nbapp.params import SliceParams

    image = demo[0][demo[0].shape[0] // 2]
    gpu = SliceSegmenter(load_model("default", device="cuda:0"))
    cpu = SliceSegmenter(load_model("default", device="cpu"))
    for params in (SliceParams(), SliceParams(downsampling=2, fine_boundaries=True)):
        a, b = gpu(image, params), cpu(image, params)
        assert a.shape == image.shape and a.dtype == np.int32
        assert a.max() > 3
        # float rounding differs between devices; the objects must not
        assert f1_score(a, b, 0.5) > 0.98
        assert np.mean((a > 0) == (b > 0)) > 0.999


def test_engine_heads_agree_across_devices(demo):
    from nbapp.engine import Engine
    from nbapp.models import load_model

    images = demo[0][:4]
    heads = [Engine(load_model("default", device=d)).infer(images)
             for d in ("cuda:0", "cpu")]
    for g, c in zip(*heads):
        assert np.abs(g.sem - c.sem).max() < 1e-2
        assert np.abs(g.offsets - c.offsets).max() < 0.1


def test_volume_on_gpu_and_cpu_workers_matches_cpu_only(demo):
    from nbapp.params import VolumeParams
    from nbapp.run3d import segment_volume

    vol = demo[0][:40]
    params = VolumeParams(orthoplane=True)
    mixed = segment_volume(vol, params=params, devices=["cuda:0", "cpu"])
    cpu = segment_volume(vol, params=params, devices=["cpu"])
    assert mixed.shape == vol.shape and mixed.max() > 3
    assert f1_score(mixed, cpu, 0.5) > 0.97


def test_default_devices_are_all_gpus():
    from nbapp.run3d import parse_devices

    assert parse_devices(None) == [f"cuda:{i}" for i in range(torch.cuda.device_count())]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two or more CUDA devices")
def test_blockwise_on_every_gpu_matches_one_gpu(demo, tmp_path):
    """One worker process per CUDA device (the block queue) gives one device's labels."""
    from nbapp.blockwise import BlockParams
    from nbapp.run3d import segment_blockwise

    np.save(tmp_path / "vol.npy", demo[0])
    blocks = BlockParams(block_size=(48, 128, 128))
    one = segment_blockwise(str(tmp_path / "vol.npy"), tmp_path / "one.zarr", "default",
                            blocks=blocks, devices="cuda:0")
    gpus = ",".join(f"cuda:{i}" for i in range(torch.cuda.device_count()))
    every = segment_blockwise(str(tmp_path / "vol.npy"), tmp_path / "all.zarr", "default",
                              blocks=blocks, devices=gpus, workers="processes")
    a, b = np.asarray(one.labels()[...]), np.asarray(every.labels()[...])
    assert one.blocks == every.blocks == 4 and a.max() > 3
    assert f1_score(a, b, 0.5) > 0.99
