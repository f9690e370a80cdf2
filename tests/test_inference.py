"""SliceSegmenter: cached network outputs, live post-processing, batch mode, the oracle round trip."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from models import data_path
from models import OracleNet, Recorder, TinyNet, dense_labels, f1_score, oracle_images, save_oracle

from nbapp import InputError, ParameterError, SliceParams, SliceSegmenter, segment_image
from nbapp.models import load_model


@pytest.fixture
def counted():
    rec = Recorder(TinyNet())
    return SliceSegmenter(load_model(rec, device="cpu")), rec


IMG = np.random.default_rng(0).integers(0, 255, (96, 80)).astype(np.uint8)


@pytest.mark.parametrize("change", [
    {"seg_threshold": 0.3}, {"center_threshold": 0.4}, {"min_distance": 7},
    {"label_divisor": 0}, {"semantic_only": True}, {"fill_holes": True}])
def test_post_processing_changes_do_not_run_the_network(counted, change):
    seg, rec = counted
    first = seg(IMG, SliceParams())
    calls = rec.calls
    again = seg(IMG.copy(), dataclasses.replace(SliceParams(), **change))
    assert rec.calls == calls
    assert seg.timings["cached"] and seg.timings["network_s"] == 0.0
    assert "postprocess_s" in seg.timings
    assert first.dtype == again.dtype == np.int32 and first.shape == IMG.shape


@pytest.mark.parametrize("change", [{"downsampling": 2}, {"fine_boundaries": True}])
def test_network_changes_run_the_network(counted, change):
    seg, rec = counted
    seg(IMG, SliceParams())
    calls = rec.calls
    seg(IMG, dataclasses.replace(SliceParams(), **change))
    assert rec.calls == calls + 1 and not seg.timings["cached"]
    assert seg.timings["network_s"] > 0


def test_new_content_or_key_runs_the_network(counted):
    seg, rec = counted
    seg(IMG, key=("xy", 0))
    seg(IMG, key=("xy", 1))
    other = IMG.copy()
    other[0, 0] ^= 1
    seg(other, key=("xy", 1))
    assert rec.calls == 1 + 3
    assert seg.cache_info()["hits"] == 0 and seg.cache_info()["misses"] == 3


def test_the_same_image_again_is_compared_not_hashed(counted, monkeypatch):
    import nbapp.inference as inference

    seg, rec = counted
    hashed = []
    real = inference._digest
    monkeypatch.setattr(inference, "_digest", lambda image: hashed.append(1) or real(image))
    img = IMG.copy()
    for thr in (0.3, 0.4, 0.5):
        seg(img, SliceParams(seg_threshold=thr))
    seg(img.copy(), SliceParams(seg_threshold=0.6))  # another array, same bytes
    assert len(hashed) == 1 and rec.calls == 1 + 1
    img[5, 5] ^= 1  # changed in place: a new image for the cache
    seg(img, SliceParams(seg_threshold=0.6))
    assert len(hashed) == 2 and rec.calls == 1 + 2
    seg(IMG, SliceParams(seg_threshold=0.6))  # back to the first image: hashed, cached heads
    assert len(hashed) == 3 and rec.calls == 1 + 2 and seg.timings["cached"]


def test_digest_reuse_compares_bytes():
    from nbapp.inference import _same_bytes

    a = np.array([0.0, np.nan, 1.0], np.float32)
    assert _same_bytes(a, a.copy())  # NaN equals itself byte for byte
    # -0.0 == 0.0, but its bytes differ
    assert not _same_bytes(a, np.array([-0.0, np.nan, 1.0], np.float32))
    assert not _same_bytes(a, a.astype(np.float64))
    assert not _same_bytes(a, a[:2])
    assert _same_bytes(np.arange(12).reshape(3, 4)[:, ::2], np.array([[0, 2], [4, 6], [8, 10]]))


def test_cache_is_bounded_lru():
    rec = Recorder(TinyNet())
    seg = SliceSegmenter(load_model(rec, device="cpu"), cache_size=2)
    a, b, c = (np.full((32, 32), v, np.uint8) for v in (1, 2, 3))
    for img in (a, b, a, c, a, b):
        seg(img)
    # a stays (recently used), b was evicted by c
    assert rec.calls == 1 + 4
    assert seg.cache_info()["entries"] == 2 and seg.cache_info()["bytes"] > 0
    seg.clear_cache()
    assert seg.cache_info()["entries"] == 0


def test_cache_is_bounded_in_bytes_and_keeps_the_newest():
    """A huge slice's outputs take gigabytes: the cache holds at most ``cache_bytes`` of
    them (the newest image's always, or the live sliders would re-run the network)."""
    rec = Recorder(TinyNet())
    one = SliceSegmenter(load_model(rec, device="cpu")).heads(np.zeros((64, 64), np.uint8)).nbytes
    seg = SliceSegmenter(load_model(rec, device="cpu"), cache_size=8, cache_bytes=2 * one)
    a, b, c = (np.full((64, 64), v, np.uint8) for v in (1, 2, 3))
    for img in (a, b, c):
        seg(img)
    assert seg.cache_info() == {"hits": 0, "misses": 3, "entries": 2, "bytes": 2 * one}
    seg(c)
    seg(b)
    assert seg.cache_info()["hits"] == 2  # b and c kept, a dropped
    tiny = SliceSegmenter(load_model(rec, device="cpu"), cache_bytes=0)
    tiny(a)
    tiny(a)
    assert tiny.cache_info()["entries"] == 1 and tiny.cache_info()["hits"] == 1
    with pytest.raises(ParameterError, match="cache_bytes"):
        SliceSegmenter(load_model(rec, device="cpu"), cache_bytes=-1)


def test_info_reports_instances_and_timings(counted):
    seg, _ = counted
    labels = seg(IMG)
    assert seg.info["instances"] == np.count_nonzero(np.unique(labels))
    assert seg.info["model"] == "Recorder"


def test_rejects_stacks_and_bad_settings(counted):
    seg, _ = counted
    with pytest.raises(InputError, match="segment_batch"):
        seg.heads(np.zeros((2, 32, 32), np.uint8))
    with pytest.raises(InputError, match=r"\(N, H, W\)"):
        seg.segment_batch(np.zeros((32, 32), np.uint8))
    with pytest.raises(ParameterError, match="cache_size"):
        SliceSegmenter(seg.model, cache_size=0)


def _oracle(labels):
    return SliceSegmenter(load_model(OracleNet(labels), device="cpu"))


@pytest.mark.parametrize("fine", [False, True])
def test_batch_mode_oracle_round_trip_restarts_ids_per_image(fine):
    labels = np.stack([dense_labels((128, 128), 12, seed=s) for s in range(3)])
    seg = _oracle(labels)
    out = seg.segment_batch(oracle_images(3, (128, 128)), SliceParams(fine_boundaries=fine,
                                                                      label_divisor=1000))
    assert out.shape == labels.shape and out.dtype == np.int32
    for o, lab in zip(out, labels):
        assert o[o > 0].min() == 1001
        assert f1_score(o, lab) >= (0.99 if fine else 0.95)


def test_segment_image_needs_batch_mode_for_stacks(tmp_path):
    labels = np.stack([dense_labels((64, 64), 6, seed=s) for s in range(2)])
    cfg = save_oracle(labels, tmp_path)
    imgs = oracle_images(2, (64, 64))
    with pytest.raises(InputError, match="batch_mode=True"):
        segment_image(imgs, cfg, device="cpu")
    out = segment_image(imgs, cfg, SliceParams(batch_mode=True), device="cpu")
    assert [f1_score(o, lab) for o, lab in zip(out, labels)] == [1.0, 1.0]
    single = segment_image(imgs[1], cfg, device="cpu")
    assert f1_score(single, labels[1]) == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("fine, bar", [(True, 0.99), (False, 0.95)])
def test_real_label_oracle_through_the_engine(fine, bar):
    import tifffile
    from skimage.measure import label as cc

    vol = tifffile.imread(data_path("lucchi_pp_train", "train_mito_instances_3d_cc.tif"))
    labels = np.stack([cc(vol[z], connectivity=1) for z in range(0, 165, 33)]).astype(np.int32)
    seg = _oracle(labels)
    out = seg.segment_batch(oracle_images(len(labels), labels.shape[1:]),
                            SliceParams(fine_boundaries=fine))
    scores = [f1_score(o, lab) for o, lab in zip(out, labels)]
    assert np.mean(scores) >= bar, scores
