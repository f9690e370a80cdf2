"""Images too large for one forward pass run in tiles (issue 29 item 2): the tile geometry, the
exact tiling of nbapp's network (whole-image standardisation and global context), the blended
tiling of other models, and when the engine tiles."""

from __future__ import annotations

import numpy as np
import pytest
from models import TinyNet
from torch import nn

from nbapp import ParameterError
from nbapp.engine import Engine
from nbapp.memory import OutOfMemory
from nbapp.models import load_model
from nbapp.params import SliceParams
from nbapp.postprocess import segment_heads
from nbapp.samples import cem_crops
from nbapp.tiled import tiled_forward
from nbapp.tiles import Tile, tile_grid, tile_window


# --- geometry ----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,core,halo", [((96, 160), 32, 0), ((224, 96), 64, 32),
                                             ((512, 512), 96, 64), ((32, 32), 32, 96)])
def test_cores_cover_the_image_once_and_boxes_hold_the_halo(shape, core, halo):
    grid = tile_grid(shape, core, halo)
    cover = np.zeros(shape, int)
    for t in grid:
        y0, y1, x0, x1 = t.core
        cover[y0:y1, x0:x1] += 1
        by0, by1, bx0, bx1 = t.box
        assert 0 <= by0 <= y0 < y1 <= by1 <= shape[0] and 0 <= bx0 <= x0 < x1 <= bx1 <= shape[1]
        # the halo is there on every side the image allows, and no more
        assert by0 == max(0, y0 - halo) and by1 == min(shape[0], y1 + halo)
        assert bx0 == max(0, x0 - halo) and bx1 == min(shape[1], x1 + halo)
        assert all(e % 32 == 0 for e in (*t.box, *t.core))
    assert (cover == 1).all()


@pytest.mark.parametrize("kw,match", [({"core": 48, "halo": 0}, "core must be a multiple"),
                                      ({"core": 0, "halo": 0}, "core must be a multiple"),
                                      ({"core": 32, "halo": 16}, "halo must be a multiple"),
                                      ({"core": 32, "halo": -32}, "halo must be a multiple")])
def test_tile_sizes_off_the_padding_grid_are_refused(kw, match):
    with pytest.raises(ParameterError, match=match):
        tile_grid((64, 64), **kw)


def test_an_image_off_the_padding_grid_is_refused():
    with pytest.raises(ValueError, match="multiples of 32"):
        tile_grid((64, 70), 32, 0)


def test_scaling_a_tile_to_a_grid_it_does_not_fall_on_is_refused():
    t = Tile((0, 64, 0, 96), (0, 32, 32, 64))
    assert t.scaled(0.25) == Tile((0, 16, 0, 24), (0, 8, 8, 16))
    assert t.scaled(2).inner == (0, 64, 64, 128)
    with pytest.raises(ValueError, match="do not fall on a grid"):
        Tile((0, 6, 0, 6), (0, 2, 0, 2)).scaled(0.25)


def test_the_window_is_one_on_the_core_and_fades_only_towards_other_tiles():
    grid = tile_grid((96, 96), 32, 32)
    middle = grid[4]  # box (0, 96) both ways, core (32, 64): halos on every side
    w = tile_window(middle)
    assert (w[32:64, 32:64] == 1).all()
    # nothing from the outer half of the halo, where the network saw the box's edge
    assert (w[:16] == 0).all() and (w[:, -16:] == 0).all()
    assert 0 < w[16, 16] < w[24, 24] < w[31, 31] < 1
    corner = tile_window(grid[0])  # core at the image's corner: its outer edges are not faded
    assert (corner[:32, :32] == 1).all() and corner[0, 40] < 1 and corner[0, 63] == 0
    # weights of overlapping tiles blend constants into the same constant (no seams)
    total = np.zeros((96, 96), np.float32)
    acc = np.zeros((96, 96), np.float32)
    for t in grid:
        by0, by1, bx0, bx1 = t.box
        ww = tile_window(t)
        total[by0:by1, bx0:bx1] += ww
        acc[by0:by1, bx0:bx1] += 3.0 * ww
    np.testing.assert_allclose(acc / total, 3.0, rtol=1e-6)


# --- nbapp's network: exact ---------------------------------------------------------------------

def _mosaic(n: int = 5) -> np.ndarray:
    """An n x n mosaic of the shipped CEM crops (224 px each), mirrored so that mitochondria
    run across the joins: real EM, larger than a tile with its halo."""
    crops = [c[1] for c in cem_crops() if c[1].shape == (224, 224)]
    rows = []
    for i in range(n):
        row = [crops[(i + j) % len(crops)] for j in range(n)]
        row = [np.fliplr(c) if j % 2 else c for j, c in enumerate(row)]
        rows.append(np.concatenate(row, axis=1))
    rows = [np.flipud(r) if i % 2 else r for i, r in enumerate(rows)]
    return np.ascontiguousarray(np.concatenate(rows, axis=0))


@pytest.fixture(scope="module")
def default_engines():
    whole = Engine("default", device="cpu", tile=0)
    return whole, Engine(whole.model, tile=256)


@pytest.mark.parametrize("ds", [1, 2])
def test_tiles_of_the_default_model_equal_the_whole_image(default_engines, ds):
    """The tile cores cut mitochondria on every face and corner; standardisation and global
    context come from the whole image; the outputs and the labels are the whole image's."""
    whole, tiled = default_engines
    image = _mosaic()
    a = whole.infer(image, ds)[0]
    b = tiled.infer(image, ds)[0]
    assert "tiles" not in a.meta and b.meta["tiled_exact"] is True
    assert b.meta["tiles"] == (5 if ds == 1 else 3) ** 2
    for x, y in ((a.sem, b.sem), (a.ctr, b.ctr)):
        assert x.shape == y.shape
        np.testing.assert_allclose(y, x, atol=1e-5)
    np.testing.assert_allclose(b.offsets, a.offsets, atol=2e-4)
    la, lb = (segment_heads(h, SliceParams(downsampling=ds)) for h in (a, b))
    assert len(np.unique(la)) > (40 if ds == 1 else 10)
    np.testing.assert_array_equal(lb, la)


def test_without_the_whole_image_context_tiles_would_differ(default_engines, monkeypatch):
    """The same tiles, each with its own standardisation and context (what a naive tiler
    does): the outputs change by far more than rounding, so the test above can fail."""
    import nbapp.tiled as tiled_mod

    whole, tiled = default_engines
    image = _mosaic()
    a = whole.infer(image)[0]
    monkeypatch.setattr(tiled_mod, "exact_network", lambda model: None)
    b = tiled.infer(image)[0]
    assert b.meta["tiled_exact"] is False
    assert np.abs(b.offsets - a.offsets).max() > 0.5


def test_tiles_at_the_smallest_core_the_model_allows(default_engines):
    whole, _ = default_engines
    image = cem_crops()[1][1]
    a = whole.infer(image)[0]
    b = Engine(whole.model, tile=1).infer(image)[0]  # rounded up to the 32 px grid
    assert b.meta["tile_core"] == 32 and b.meta["tiles"] == 49
    np.testing.assert_allclose(b.sem, a.sem, atol=1e-5)
    np.testing.assert_allclose(b.offsets, a.offsets, atol=2e-4)


# --- other models: blended ---------------------------------------------------------------------

def _assert_blend_is_the_whole_image(model, tile: int, tiles: int) -> None:
    """The model's blended tiles of a 448 px mosaic give the untiled outputs."""
    image = _mosaic(2)
    a = Engine(model, tile=0).infer(image)[0]
    b = Engine(model, tile=tile).infer(image)[0]
    assert b.meta["tiled_exact"] is False and b.meta["tiles"] == tiles
    np.testing.assert_allclose(b.sem, a.sem, atol=1e-5)
    np.testing.assert_allclose(b.ctr, a.ctr, atol=1e-5)
    np.testing.assert_allclose(b.offsets, a.offsets, atol=1e-4)


def test_blended_tiles_of_a_local_model_equal_the_whole_image():
    _assert_blend_is_the_whole_image(load_model(TinyNet(), device="cpu"), 64, 49)


def test_blended_tiles_of_a_zoo_contract_torchscript_file_equal_the_whole_image(tmp_path):
    """The registry's stand-in (a TorchScript file with a zoo model's classes and padding
    factor, as MitoNet_v1 is shipped): no nbapp network inside, so its tiles are blended;
    with local convolutions the blend is the whole image's."""
    from models import standin_bytes

    path = tmp_path / "MitoNet_standin.pth"
    path.write_bytes(standin_bytes(1, 16))
    _assert_blend_is_the_whole_image(load_model(str(path), device="cpu"), 96, 25)


class _GlobalPoolNet(TinyNet):
    """TinyNet plus a global average of its features (as MitoNet's ASPP pools the image)."""

    def forward(self, x, render_steps: int = 2, interpolate_ins: bool = True):
        out = super().forward(x, render_steps, interpolate_ins)
        g = nn.functional.adaptive_avg_pool2d(x, 1) * 50.0
        out["sem_logits"] = out["sem_logits"] + g
        return out


def test_a_model_that_pools_the_whole_image_is_blended_and_says_so():
    model = load_model(_GlobalPoolNet(), device="cpu")
    image = _mosaic(2)
    image[:, :224] = 0  # a dark left side: tiles there pool another mean
    a = Engine(model, tile=0).infer(image)[0]
    b = Engine(model, tile=64).infer(image)[0]
    assert b.meta["tiled_exact"] is False
    assert np.abs(b.sem - a.sem).max() > 0.01  # not the whole image's: the flag is needed
    assert np.isfinite(b.sem).all() and (b.sem >= 0).all() and (b.sem <= 1).all()


def test_tiled_forward_reports_progress_of_both_passes(default_engines):
    whole, _ = default_engines
    mean, std = whole.model.config.norms
    x = ((cem_crops()[1][1][:192, :192] / 255.0 - mean) / std).astype(np.float32)
    seen = []
    out = tiled_forward(whole.model, x, 2, False, 64, progress=lambda d, t: seen.append((d, t)))
    assert out.tiles == 9 and out.exact
    assert seen == [(i, 18) for i in range(1, 19)]


# --- when the engine tiles ---------------------------------------------------------------------

def test_the_engine_tiles_only_what_would_not_fit(monkeypatch, default_engines):
    import nbapp.memory as memory

    whole, _ = default_engines
    auto = Engine(whole.model)
    monkeypatch.setattr(memory, "available_bytes", lambda: 64 << 30)
    assert auto.tile_core((2048, 2048)) is None
    assert auto.tile_core((8000, 8000), downsampling=2) is None
    assert auto.tile_core((20000, 20000)) is not None
    monkeypatch.setattr(memory, "available_bytes", lambda: 8 << 30)
    core = auto.tile_core((20000, 20000))
    assert core is not None and core % 512 == 0
    # the tile with its halo fits a quarter of what is left
    assert (core + 2 * 512) ** 2 * 120 <= (8 << 30) / 4
    assert Engine(whole.model, tile=0).tile_core((20000, 20000)) is None
    assert Engine(whole.model, tile=100).tile_core((64, 64)) == 128


def test_an_image_that_does_not_fit_even_in_tiles_says_what_to_do(monkeypatch, default_engines):
    import nbapp.memory as memory

    whole, _ = default_engines
    monkeypatch.setattr(memory, "available_bytes", lambda: 500 << 20)
    with pytest.raises(OutOfMemory, match=r"^out of memory: image of 4000x4000 at downsampling 1 "
                                          r"in tiles of 512 px needs .* use Image Downsampling 4$"):
        Engine(whole.model).infer(np.zeros((4000, 4000), np.uint8))
    auto = Engine(whole.model)
    allowed = 0.9 * (500 << 20)
    assert auto.tiled_memory_needed((4000, 4000), 512, 4) <= allowed  # the factor named fits
    assert auto.tiled_memory_needed((4000, 4000), 512, 2) > allowed  # and is the smallest
    assert auto.memory_needed((4000, 4000), 1, 2) > allowed
    monkeypatch.setattr(memory, "available_bytes", lambda: 256 << 20)
    with pytest.raises(OutOfMemory, match="in tiles of 512 px .* use a smaller image or crop$"):
        auto.infer(np.zeros((8000, 8000), np.uint8))  # the full-size maps alone do not fit
    # a small image is not tiled when its tiles would need more than itself: the untiled
    # refusal, with its own hint, stands
    monkeypatch.setattr(memory, "available_bytes", lambda: 60 << 20)
    assert auto.tile_core((1024, 1024)) is None


@pytest.mark.parametrize("tile", [-1, 1.5, True, "big"])
def test_a_wrong_tile_size_is_refused(tile):
    with pytest.raises(ParameterError, match="tile must be"):
        Engine(load_model(TinyNet(), device="cpu"), tile=tile)
