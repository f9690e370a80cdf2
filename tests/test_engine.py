"""The engine: normalisation (with the FIX), anti-aliased downsampling, padding, render_steps,
batching, devices and input checks; run with tiny random models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from models import Recorder, RenderNet, TinyNet

from nbapp import InputError, ParameterError
from nbapp.engine import Engine
from nbapp.models import load_model


def engine_for(net, **kw) -> tuple[Engine, Recorder]:
    rec = Recorder(net)
    return Engine(load_model(rec, device="cpu"), **kw), rec


def unit_input(rec: Recorder, engine: Engine) -> np.ndarray:
    """The last network input mapped back from normalised to [0, 1] units."""
    mean, std = engine.model.config.norms
    return (rec.last_x[:, 0].numpy() * std + mean)


@pytest.mark.parametrize("shape", [(100, 130), (64, 64), (17, 300)])
@pytest.mark.parametrize("fine", [False, True])
def test_output_shapes_are_cropped_to_the_image(shape, fine):
    eng, rec = engine_for(TinyNet())
    h = eng.infer(np.zeros(shape, np.uint8), fine_boundaries=fine)[0]
    g = 1 if fine else 4
    assert h.sem.shape == (1, *shape)
    assert h.ctr.shape == (-(-shape[0] // g), -(-shape[1] // g))
    assert h.offsets.shape == (2, *h.ctr.shape)
    assert h.grid_step == g and h.downsampling == 1
    xh, xw = rec.last_x.shape[2:]
    assert xh % 16 == 0 and xw % 16 == 0 and xh < shape[0] + 16
    assert rec.last_args == (2, fine)


def test_padding_is_zero_in_normalised_units():
    eng, rec = engine_for(TinyNet())
    eng.infer(np.full((20, 20), 200, np.uint8))
    x = rec.last_x[0, 0]
    assert x.shape == (32, 32)
    assert torch.all(x[20:, :] == 0) and torch.all(x[:, 20:] == 0)
    mean, std = eng.model.config.norms
    assert torch.allclose(x[:20, :20], torch.tensor((200 / 255 - mean) / std))


@pytest.mark.parametrize("ds", [2, 4, 8])
def test_downsampling_shapes_and_render_steps(ds):
    eng, rec = engine_for(TinyNet())
    h = eng.infer(np.zeros((250, 260), np.uint8), downsampling=ds)[0]
    hd, wd = -(-250 // ds), -(-260 // ds)
    assert h.sem.shape == (1, 250, 260)  # upsampled back to the original size
    assert h.ctr.shape == (-(-hd // 4), -(-wd // 4))
    assert rec.last_args[0] == 2 + int(np.log2(ds))
    assert h.downsampling == ds


def test_model_that_renders_finer_is_used_at_original_resolution():
    eng, _ = engine_for(RenderNet())
    h = eng.infer(np.zeros((128, 96), np.uint8), downsampling=4)[0]
    assert h.sem.shape == (1, 128, 96)


def test_downsampling_is_anti_aliased():
    # a one-pixel checkerboard: decimation would give a constant 0 or 1, anti-aliasing ~0.5
    img = (np.indices((128, 128)).sum(0) % 2 * 255).astype(np.uint8)
    eng, rec = engine_for(TinyNet())
    eng.infer(img, downsampling=2)
    x = unit_input(rec, eng)[0, :64, :64]
    assert abs(x.mean() - 0.5) < 0.05 and x.std() < 0.05


def test_uint8_uses_fixed_range():
    eng, rec = engine_for(TinyNet())
    img = np.full((32, 32), 51, np.uint8)
    eng.infer(img)
    assert np.allclose(unit_input(rec, eng)[0, :32, :32], 0.2, atol=1e-5)


@pytest.mark.parametrize("dtype, scale", [(np.uint16, 16), (np.int32, 1), (np.uint16, 1),
                                           (np.float32, 1000.0)])
def test_non_uint8_data_is_rescaled_not_divided_by_dtype_max(dtype, scale):
    """The FIX: 12-bit data in uint16 (or 8-bit data in int32) must not become nearly constant."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (64, 64))
    eng, rec = engine_for(TinyNet())
    heads = eng.infer((base * scale).astype(dtype))[0]
    x = unit_input(rec, eng)[0, :64, :64]
    assert x.min() >= -1e-6 and x.max() <= 1 + 1e-6
    assert x.std() > 0.25  # uniform 0-1 data has std 0.29; dividing by 65535 would give ~0.001
    assert "percentiles" in heads.meta["intensity"]
    ref = (base / 255.0)
    assert np.corrcoef(x.ravel(), ref.ravel())[0, 1] > 0.999


def test_float_in_unit_range_is_taken_as_is():
    img = np.linspace(0.2, 0.7, 32 * 32, dtype=np.float32).reshape(32, 32)
    eng, rec = engine_for(TinyNet())
    h = eng.infer(img)[0]
    assert np.allclose(unit_input(rec, eng)[0, :32, :32], img, atol=1e-5)
    assert "as it is" in h.meta["intensity"]


def test_given_intensity_range_is_used_for_every_slice():
    eng, rec = engine_for(TinyNet())
    eng.infer(np.full((32, 32), 300, np.uint16), intensity=(100, 500))
    assert np.allclose(unit_input(rec, eng)[0, :32, :32], 0.5, atol=1e-5)


def test_batches_give_the_same_heads_as_single_images():
    rng = np.random.default_rng(1)
    stack = rng.integers(0, 255, (5, 48, 40)).astype(np.uint8)
    eng, rec = engine_for(TinyNet(), batch_size=2)
    batched = eng.infer(stack, intensity=(0, 255))
    assert rec.calls == 1 + 3  # warm-up + ceil(5 / 2)
    for img, h in zip(stack, batched):
        single = eng.infer(img)[0]
        np.testing.assert_allclose(single.sem, h.sem, atol=1e-5)
        np.testing.assert_allclose(single.offsets, h.offsets, atol=1e-4)


def test_model_is_loaded_and_warmed_once():
    eng, rec = engine_for(TinyNet())
    assert rec.calls == 1
    eng.infer(np.zeros((32, 32), np.uint8))
    eng.infer(np.zeros((32, 32), np.uint8))
    assert rec.calls == 3


def test_multiclass_probabilities_sum_to_one():
    eng, _ = engine_for(TinyNet(classes=3))
    h = eng.infer(np.random.default_rng(0).integers(0, 255, (40, 40)).astype(np.uint8))[0]
    assert h.sem.shape == (3, 40, 40)
    np.testing.assert_allclose(h.sem.sum(0), 1.0, atol=1e-5)


@pytest.mark.parametrize("image, message", [
    (np.zeros((4, 32, 32, 3), np.uint8), "expected a 2D image"),
    (np.zeros(32, np.uint8), "expected a 2D image"),
    (np.zeros((32, 32), bool), "dtype bool"),
    (np.zeros((32, 32), np.complex64), "complex"),
    (np.array([[np.nan] * 32] * 32, np.float32), "NaN or infinite"),
    (np.full((32, 32), np.inf, np.float64), "NaN or infinite"),
    (np.zeros((0, 32), np.uint8), "empty"),
    (np.zeros((10, 40), np.uint8), "smaller than the 16 px the model needs \\(padding factor 16\\)"),
    (np.array([["a"] * 32] * 32), "expected integer or float"),
])
def test_bad_images_are_rejected_with_the_reason(image, message):
    eng, _ = engine_for(TinyNet())
    with pytest.raises(InputError, match=message):
        eng.infer(image)


def test_downsampling_too_far_for_the_image():
    eng, _ = engine_for(TinyNet())
    with pytest.raises(InputError, match="after downsampling by 8 it is 8x8"):
        eng.infer(np.zeros((64, 64), np.uint8), downsampling=8)
    with pytest.raises(ParameterError, match="downsampling must be one of"):
        eng.infer(np.zeros((64, 64), np.uint8), downsampling=3)
    with pytest.raises(ParameterError, match="batch_size"):
        Engine(eng.model, batch_size=0)
