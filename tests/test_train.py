"""Tests of the training pipeline (nbapp.train) on tiny synthetic volumes."""

import argparse
import json

import numpy as np
import pytest
import torch
import yaml
from skimage.measure import label as cc_label

from nbapp.train import PatchSampler, add_arguments, config_dict, run

tifffile = pytest.importorskip("tifffile")


def _blob_volume(shape=(24, 64, 64), seed=0):
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.indices(shape)
    labels = np.zeros(shape, np.uint16)
    for i in range(1, 6):
        c = rng.uniform([4, 10, 10], [shape[0] - 4, shape[1] - 10, shape[2] - 10])
        r = rng.uniform(4, 8)
        labels[((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) < r**2] = i
    raw = (120 + 80 * (labels > 0) + rng.normal(0, 10, shape)).clip(0, 255).astype(np.uint8)
    return raw, labels


def _volume_files(tmp_path, shape=(24, 64, 64)):
    """A blob volume and its labels written as TIFFs: (raw path, labels path)."""
    raw, labels = _blob_volume(shape)
    rp, lp = tmp_path / "raw.tif", tmp_path / "lab.tif"
    tifffile.imwrite(rp, raw)
    tifffile.imwrite(lp, labels)
    return rp, lp


def _assert_consistent_sample(s, p):
    """A sample's image is (p, p) float32 in [0, 1]; its semantic target is its foreground; every
    foreground pixel's offset lands on a heat-map peak (where it lands inside the patch); there
    are no offsets off the foreground. Returns whether the sample had any foreground."""
    assert s["image"].shape == (p, p) and s["image"].dtype == np.float32
    assert s["offsets"].shape == (2, p, p)
    assert 0.0 <= s["image"].min() and s["image"].max() <= 1.0
    np.testing.assert_array_equal(s["semantic"] > 0, s["fg"])
    assert np.all(s["offsets"][:, ~s["fg"]] == 0)
    yy, xx = np.nonzero(s["fg"])
    if yy.size == 0:
        return False
    cy = np.round(yy + s["offsets"][0, yy, xx]).astype(int)
    cx = np.round(xx + s["offsets"][1, yy, xx]).astype(int)
    inside = (cy >= 0) & (cy < p) & (cx >= 0) & (cx < p)
    assert s["heatmap"][cy[inside], cx[inside]].min() > 0.95
    return True


def test_sampler_offsets_point_at_heatmap_peaks_after_rotation():
    raw, labels = _blob_volume()
    sampler = PatchSampler(raw.astype(np.float32) / 255, labels.astype(np.int32), 64,
                           np.random.default_rng(3))
    assert sum(_assert_consistent_sample(sampler.sample(), 64) for _ in range(12)) > 3


def test_sampler_is_reproducible():
    raw, labels = _blob_volume()
    unit, lab = raw.astype(np.float32) / 255, labels.astype(np.int32)
    a = PatchSampler(unit, lab, 32, np.random.default_rng(7)).batch(2, {"mean": 0.5, "std": 0.2})
    b = PatchSampler(unit, lab, 32, np.random.default_rng(7)).batch(2, {"mean": 0.5, "std": 0.2})
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    assert a["image"].shape == (2, 1, 32, 32) and a["offsets"].shape == (2, 2, 32, 32)


def test_config_dict_is_empanada_format():
    cfg = config_dict({"mean": 0.5, "std": 0.1}, "line one\nline two\n")
    assert cfg["class_names"] == {1: "mito"} and cfg["labels"] == [1]
    assert cfg["thing_list"] == [1] and cfg["model"] == "nbapp_mito.pt"
    assert cfg["padding_factor"] % 16 == 0


def _args(tmp_path, raw, labels, **kw):
    parser = add_arguments(argparse.ArgumentParser())
    argv = ["--raw", str(raw), "--labels", str(labels), "--out", str(tmp_path / "out"),
            "--steps", "2", "--batch-size", "2", "--patch", "64", "--val-slices", "4",
            "--val-every", "1", "--val-stride", "2", "--no-progress", "--threads", "1"]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", *map(str, v if isinstance(v, list) else [v])]
    return parser.parse_args(argv)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*torch.jit.*:DeprecationWarning")
def test_run_writes_outputs_and_resumes(tmp_path):
    rp, lp = _volume_files(tmp_path)
    assert run(_args(tmp_path, rp, lp)) == 0
    out = tmp_path / "out"
    ck = torch.load(out / "best.pth", weights_only=True)
    assert set(ck) >= {"state_dict", "arch", "norms", "metrics"}
    last = torch.load(out / "last.pth", weights_only=True)
    assert last["step"] == 2
    cfg = yaml.safe_load((out / "nbapp_mito.yaml").read_text())
    assert cfg["model"] == "nbapp_mito.pt" and set(cfg["norms"]) == {"mean", "std"}
    model = torch.jit.load(str(out / "nbapp_mito.pt"))
    assert model(torch.zeros(1, 1, 64, 64), 2, True)["offsets"].shape == (1, 2, 64, 64)
    assert run(_args(tmp_path, rp, lp, steps=3, resume=out / "last.pth")) == 0
    assert torch.load(out / "last.pth", weights_only=True)["step"] == 3


def test_time_limit_stops_and_still_saves(tmp_path):
    rp, lp = _volume_files(tmp_path, (12, 32, 32))
    assert run(_args(tmp_path, rp, lp, time_limit=0, patch=32)) == 0
    last = torch.load(tmp_path / "out" / "last.pth", weights_only=True)
    assert last["step"] == 0 and (tmp_path / "out" / "nbapp_mito.pt").exists()


@pytest.mark.filterwarnings("ignore:.*torch.jit.*:DeprecationWarning")
def test_workers_arch_and_stop_after_resume(tmp_path):
    rp, lp = _volume_files(tmp_path, (12, 32, 32))
    arch = '{"widths": [8, 8, 16, 16, 24], "depths": [0, 1, 1, 2, 1], "decoder_width": 16}'
    # --stop-after 0 ends before the first step, saving a resumable checkpoint
    assert run(_args(tmp_path, rp, lp, patch=32, arch=arch, stop_after=0)) == 0
    out = tmp_path / "out"
    last = torch.load(out / "last.pth", weights_only=True)
    assert last["step"] == 0 and last["arch"]["widths"] == [8, 8, 16, 16, 24]
    # resuming keeps the checkpoint's architecture, and 2 worker processes feed the batches
    assert run(_args(tmp_path, rp, lp, patch=32, workers=2, resume=out / "last.pth")) == 0
    last = torch.load(out / "last.pth", weights_only=True)
    assert last["step"] == 2 and last["arch"]["depths"] == [0, 1, 1, 2, 1]
    assert last["state_dict"]["stem.0.weight"].shape[0] == 8
    shipped = torch.jit.load(str(out / "nbapp_mito.pt"))
    assert shipped(torch.zeros(1, 1, 32, 32), 2, False)["ctr_hmp"].shape == (1, 1, 8, 8)


def test_worker_batches_are_seeded_per_worker():
    from nbapp.training.data import _PatchStream

    raw, labels = _blob_volume((12, 32, 32))
    unit, lab = raw.astype(np.float32) / 255, labels.astype(np.int32)
    norms = {"mean": 0.5, "std": 0.2}
    template = PatchSampler(unit, lab, 32, np.random.default_rng(0))
    a = next(iter(_PatchStream(template, 2, norms, seed=1, start_step=0)))
    b = next(iter(_PatchStream(template, 2, norms, seed=1, start_step=0)))
    c = next(iter(_PatchStream(template, 2, norms, seed=1, start_step=5)))
    torch.testing.assert_close(a["image"], b["image"])
    assert not torch.equal(a["image"], c["image"])


@pytest.mark.parametrize("kw, match", [({"patch": 48}, "multiple of"),
                                       ({"val_slices": 0}, "val-slices"),
                                       ({"arch": "[1, 2]"}, "JSON object"),
                                       ({"pad_p": 1.5}, "pad-p"),
                                       ({"zoom_out_p": -0.1}, "zoom-out-p"),
                                       ({"zoom_out_max": 1.0}, "zoom-out-max"),
                                       ({"zoom_in_max": 0.5}, "zoom-in-max"),
                                       ({"shading_p": 2}, "shading-p"),
                                       ({"synthetic_p": -1}, "synthetic-p"),
                                       ({"hard_negatives_p": 1.1}, "hard-negatives-p"),
                                       ({"gamma": [0, 1]}, "--gamma"),
                                       ({"gamma": [2, 1]}, "--gamma"),
                                       ({"arch": "{widths"}, "JSON object"),
                                       ({"arch": '{"width": 3}'}, "unknown hyper"),
                                       ({"planes": "xy,zz"}, "--planes"),
                                       ({"planes": "xy,xy"}, "--planes"),
                                       ({"planes": ","}, "--planes"),
                                       ({"init": "missing.pth"}, "no such file")])
def test_bad_arguments(tmp_path, kw, match):
    rp, lp = _volume_files(tmp_path, (12, 32, 32))
    with pytest.raises(ValueError, match=match):
        run(_args(tmp_path, rp, lp, **kw))


def test_padding_band_has_no_objects_and_the_engine_pad_value():
    from nbapp.train import AugmentConfig

    raw, labels = _blob_volume()
    unit, lab = raw.astype(np.float32) / 255, labels.astype(np.int32)
    sampler = PatchSampler(unit, lab, 64, np.random.default_rng(5), aug=AugmentConfig(pad_p=1.0))
    norms = {"mean": 0.5, "std": 0.2}
    seen = 0
    for _ in range(6):
        s = sampler.sample()
        pad = s["pad"]
        assert pad.any() and (pad[-1].all() or pad[:, -1].all())
        assert not s["fg"][pad].any() and not s["semantic"][pad].any()
        assert not s["offsets"][:, pad].any()
        seen += int(s["fg"].any())
    assert seen
    b = PatchSampler(unit, lab, 64, np.random.default_rng(5),
                     aug=AugmentConfig(pad_p=1.0)).batch(3, norms)
    assert "pad" not in b
    # the band holds exactly the normalised 0 the engine pads with: a full last row or column
    for img in b["image"][:, 0]:
        assert bool((img[-1] == 0).all()) or bool((img[:, -1] == 0).all())


@pytest.mark.filterwarnings("ignore:.*torch.jit.*:DeprecationWarning")
def test_init_with_weight_free_arch_options(tmp_path):
    rp, lp = _volume_files(tmp_path, (12, 32, 32))
    arch = '{"widths": [8, 8, 16, 16, 24], "depths": [0, 1, 1, 2, 1], "decoder_width": 16}'
    assert run(_args(tmp_path / "a", rp, lp, patch=32, arch=arch)) == 0
    first = tmp_path / "a" / "out" / "last.pth"
    # --init keeps the checkpoint's weights and architecture, --arch switches input_norm on
    assert run(_args(tmp_path / "b", rp, lp, patch=32, init=first,
                     arch='{"input_norm": true}')) == 0
    ck = torch.load(tmp_path / "b" / "out" / "last.pth", weights_only=True)
    assert ck["arch"]["input_norm"] is True and ck["arch"]["widths"] == [8, 8, 16, 16, 24]
    shipped = torch.jit.load(str(tmp_path / "b" / "out" / "nbapp_mito.pt"))
    assert shipped.input_norm
    # an --arch that changes the weights' shapes cannot start from those weights
    with pytest.raises(ValueError, match="weight-free"):
        run(_args(tmp_path / "c", rp, lp, patch=32, init=first, arch='{"decoder_width": 8}'))


def test_shading_is_a_ramp_across_the_patch():
    from nbapp.train import AugmentConfig

    flat = np.full((64, 64), 0.5, np.float32)
    aug = AugmentConfig(shading_p=1.0, contrast=(1, 1), brightness=0, gamma=(1, 1), noise_p=0,
                        blur_p=0, lowres_p=0)
    sampler = PatchSampler(flat[None], np.zeros((1, 64, 64), np.int32), 64,
                           np.random.default_rng(2), aug=aug)
    out = sampler._photometric(flat.copy())
    assert out.std() > 0.01  # uneven
    # a plane: second differences vanish along both axes
    assert np.abs(np.diff(out, 2, axis=0)).max() < 1e-5
    assert np.abs(np.diff(out, 2, axis=1)).max() < 1e-5
    assert abs(float(out.mean()) - 0.5) < 1e-3


def test_fitted_patches_stay_inside_the_plane_and_zoom_out_in_xy():
    from nbapp.train import AugmentConfig

    # grey level linear in (y, x) of the xy plane and constant in z: bilinear sampling inside
    # the plane reproduces a linear ramp exactly, content mirrored at an edge bends it
    z, y, x = 8, 160, 200
    ramp = np.arange(y)[:, None] * 0.6 + np.arange(x)[None, :] * 0.4
    unit = np.broadcast_to((ramp / ramp.max()).astype(np.float32)[None], (z, y, x)).copy()
    labels = np.zeros((z, y, x), np.int32)
    quiet = dict(contrast=(1, 1), brightness=0, gamma=(1, 1), noise_p=0, blur_p=0, lowres_p=0,
                 pad_p=0, scale_hi=1.2, zoom_out_p=1.0, zoom_out_hi=1.3)  # (no anti-aliasing)

    def bends(sampler, n=20):
        out = []
        for _ in range(n):
            img = sampler.sample()["image"].astype(np.float64)
            out.append(max(np.abs(np.diff(img, 2, axis=0)).max(),
                           np.abs(np.diff(img, 2, axis=1)).max()) > 1e-4)
        return out

    fitted = PatchSampler(unit, labels, 64, np.random.default_rng(0),
                          aug=AugmentConfig(**quiet))
    assert not any(bends(fitted))  # zoomed out, always from xy, always inside
    loose = PatchSampler(unit, labels, 64, np.random.default_rng(0),
                         aug=AugmentConfig(fit=False, **quiet))
    assert sum(bends(loose)) >= 5  # from xz / yz (8 rows) or over an edge: mirrored


def test_object_contrast_changes_objects_not_background():
    from nbapp.train import AugmentConfig

    rng = np.random.default_rng(1)
    img = (0.5 + 0.05 * rng.standard_normal((64, 64))).astype(np.float32)
    inst = np.zeros((64, 64), np.int32)
    inst[20:40, 20:40] = 1
    sampler = PatchSampler(img[None], inst[None], 64, np.random.default_rng(3),
                           aug=AugmentConfig(object_p=1.0, object_shift=(-0.3, -0.3),
                                             object_gain=(1, 1)))
    out = sampler._object_contrast(img.copy(), inst)
    np.testing.assert_allclose(out[:10], img[:10])  # far from the object: unchanged
    np.testing.assert_allclose(out[25:35, 25:35], np.clip(img[25:35, 25:35] - 0.3, 0, 1),
                               atol=1e-3)  # inside: darker by the shift
    assert np.all(sampler._object_contrast(img, np.zeros_like(inst)) == img)  # no objects


def test_synthetic_patches_have_matching_targets_and_the_padding_band():
    from nbapp.train import AugmentConfig

    raw, labels = _blob_volume()
    sampler = PatchSampler(raw.astype(np.float32) / 255, labels.astype(np.int32), 96,
                           np.random.default_rng(4), aug=AugmentConfig(synthetic_p=1.0, pad_p=1.0,
                                                             hard_negatives_p=0.5))
    n_obj = 0
    for _ in range(6):
        s = sampler.sample()
        assert s["pad"].any() and not s["fg"][s["pad"]].any()  # no objects in the band
        _assert_consistent_sample(s, 96)
        n_obj += cc_label(s["fg"], connectivity=2).max()
    assert n_obj > 5


TINY = '{"widths": [8, 8, 16, 16, 24], "depths": [0, 1, 1, 2, 1], "decoder_width": 16}'


def _outputs(model, x):
    with torch.no_grad():
        return {k: v.clone() for k, v in model(x, 2, False).items()}


def _assert_same_function(a, b, atol=1e-3):
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=k)


@pytest.mark.filterwarnings("ignore:.*torch.jit.*:DeprecationWarning")
def test_from_export_rebuilds_the_shipped_network_and_recalibrates_batchnorm():
    from nbapp.models.arch import arch_of_export, from_export, recalibrate_batchnorm
    from nbapp.models.loader import default_config_path
    from nbapp.samples import demo_volume

    shipped = torch.jit.load(str(default_config_path().with_suffix(".pt")), map_location="cpu")
    arch = arch_of_export(shipped)
    assert arch == {"widths": [16, 32, 64, 160, 256], "depths": [0, 1, 3, 6, 3],
                    "decoder_width": 64, "offset_scale": 16.0, "ctr_smooth": 1.0,
                    "ctr_gate": True, "input_norm": True, "sem_smooth": 1.0}
    net, _ = from_export(shipped)
    vol = demo_volume()[0]
    x = torch.from_numpy((vol[8:12, :128, :128] / 255.0 - 0.5469) / 0.1187).float()[:, None]
    want = _outputs(shipped, x)
    _assert_same_function(want, _outputs(net, x))
    # recalibrated: the statistics are the stem convolution's real ones, the function the same
    assert recalibrate_batchnorm(net, [x[:2], x[2:]]) == 4
    with torch.no_grad():
        from nbapp.models.arch import standardise

        stem = net.stem[0](standardise(x))
    torch.testing.assert_close(net.stem[1].running_mean, stem.mean(dim=(0, 2, 3)),
                               atol=1e-4, rtol=1e-4)
    assert float(net.stem[1].running_var.min()) > 0
    _assert_same_function(want, _outputs(net, x))
    # train mode (batch statistics) now starts from the shipped function too
    net.train()
    _assert_same_function(want, _outputs(net, x), atol=5e-3)


@pytest.mark.filterwarnings("ignore:.*torch.jit.*:DeprecationWarning")
def test_arch_of_export_reads_any_nbapp_export_and_rejects_other_models(tmp_path):
    from nbapp.models.arch import arch_of_export, build_model, from_export, save_torchscript

    arch = {**json.loads(TINY), "offset_scale": 8.0, "ctr_smooth": 1.5, "ctr_gate": True,
            "input_norm": True, "sem_smooth": 0.75}
    torch.manual_seed(0)
    model = build_model(**arch)
    model.train()
    for _ in range(3):  # batch-norm statistics that are not the identity
        model(torch.randn(2, 1, 64, 64) * 3 + 1)
    save_torchscript(model.eval(), tmp_path / "m.pt")
    scripted = torch.jit.load(str(tmp_path / "m.pt"))
    assert arch_of_export(scripted) == arch
    x = torch.randn(2, 1, 64, 64)
    _assert_same_function(_outputs(model, x), _outputs(from_export(scripted)[0], x))

    # a training (unfolded) network has batch-norm weights where an export has none
    with pytest.raises(ValueError, match="do not fit the NBMitoNet"):
        from_export(model)

    class NotOurs(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    with pytest.raises(ValueError, match="not an nbapp NBMitoNet export"):
        arch_of_export(torch.jit.script(NotOurs()))


@pytest.mark.filterwarnings("ignore:.*torch.jit.*:DeprecationWarning")
def test_init_from_an_exported_model_fine_tunes_it(tmp_path):
    rp, lp = _volume_files(tmp_path, (12, 64, 64))
    assert run(_args(tmp_path / "a", rp, lp, patch=32, arch=TINY, steps=1)) == 0
    first = tmp_path / "a" / "out"
    first_norms = torch.load(first / "last.pth", weights_only=True)["norms"]
    for spec in (first / "nbapp_mito.pt", first / "nbapp_mito.yaml"):
        out = tmp_path / spec.suffix[1:]
        assert run(_args(out, rp, lp, patch=32, init=spec, planes="xy")) == 0
        ck = torch.load(out / "out" / "last.pth", weights_only=True)
        assert ck["arch"]["widths"] == [8, 8, 16, 16, 24] and ck["arch"]["ctr_smooth"] == 0.0
        assert ck["arch"]["sem_smooth"] == 0.0  # export-only, re-added at export
        assert ck["norms"] == pytest.approx(first_norms, abs=1e-4)
        cfg = yaml.safe_load((out / "out" / "nbapp_mito.yaml").read_text())
        assert f"fine-tuned from {spec}" in cfg["description"]
        assert torch.jit.load(str(out / "out" / "nbapp_mito.pt")).ctr_gate  # export settings


@pytest.mark.filterwarnings("ignore:.*torch.jit.*:DeprecationWarning")
def test_export_checkpoint_uses_the_shipped_export_options(tmp_path):
    from nbapp.models.arch import arch_of_export
    from nbapp.train import EXPORT_OPTIONS, export_checkpoint

    rp, lp = _volume_files(tmp_path, (12, 32, 32))
    assert run(_args(tmp_path, rp, lp, patch=32, arch=TINY, steps=1)) == 0
    last = tmp_path / "out" / "last.pth"
    ck = export_checkpoint(last, tmp_path / "a.pt")
    assert ck["step"] == 1
    got = arch_of_export(torch.jit.load(str(tmp_path / "a.pt")))
    assert {k: got[k] for k in EXPORT_OPTIONS} == EXPORT_OPTIONS
    # the CLI's export defaults are the same options
    args = _args(tmp_path, rp, lp)
    assert (args.export_ctr_smooth, args.export_ctr_gate, args.export_sem_smooth) == (
        EXPORT_OPTIONS["ctr_smooth"], EXPORT_OPTIONS["ctr_gate"], EXPORT_OPTIONS["sem_smooth"])
    export_checkpoint(last, tmp_path / "b.pt", sem_smooth=0.0)
    assert arch_of_export(torch.jit.load(str(tmp_path / "b.pt")))["sem_smooth"] == 0.0
    with pytest.raises(ValueError, match="unknown export options"):
        export_checkpoint(last, tmp_path / "c.pt", sem_smoth=1.0)


@pytest.mark.filterwarnings("ignore:.*torch.jit.*:DeprecationWarning")
def test_init_default_starts_from_the_shipped_model(tmp_path):
    from nbapp.models import read_config
    from nbapp.models.loader import default_config_path

    rp, lp = _volume_files(tmp_path, (12, 64, 64))
    assert run(_args(tmp_path, rp, lp, init="default", steps=1, batch_size=1)) == 0
    ck = torch.load(tmp_path / "out" / "last.pth", weights_only=True)
    mean, std = read_config(default_config_path()).norms
    assert ck["norms"] == pytest.approx({"mean": mean, "std": std})
    assert ck["arch"]["widths"] == [16, 32, 64, 160, 256] and ck["arch"]["input_norm"] is True


def test_init_rejects_a_model_nbapp_cannot_train(tmp_path):
    class NotOurs(torch.nn.Module):
        def forward(self, x: torch.Tensor, render_steps: int = 2,
                    interpolate_ins: bool = True) -> dict[str, torch.Tensor]:
            return {"sem_logits": x}

    rp, lp = _volume_files(tmp_path, (12, 32, 32))
    torch.jit.save(torch.jit.script(NotOurs()), str(tmp_path / "other.pt"))
    with pytest.raises(ValueError, match="only models exported by nbapp"):
        run(_args(tmp_path, rp, lp, patch=32, init=tmp_path / "other.pt"))


def test_planes_limit_where_real_patches_come_from(monkeypatch):
    import nbapp.training.data as data

    seen = []
    real_plane = data.get_slice
    monkeypatch.setattr(data, "get_slice", lambda vol, plane, i: seen.append(plane)
                        or real_plane(vol, plane, i))
    raw, labels = _blob_volume((12, 64, 64))
    unit, lab = raw.astype(np.float32) / 255, labels.astype(np.int32)
    PatchSampler(unit, lab, 32, np.random.default_rng(0), planes=("xy",)).batch(12, {
        "mean": 0.5, "std": 0.2})
    assert seen and set(seen) == {"xy"}
    seen.clear()
    PatchSampler(unit, lab, 32, np.random.default_rng(0)).batch(24, {"mean": 0.5, "std": 0.2})
    assert set(seen) == {"xy", "xz", "yz"}
    seen.clear()
    sampler = PatchSampler(unit, lab, 32, np.random.default_rng(0), planes=("xz", "yz"))
    sampler.with_rng(np.random.default_rng(1)).batch(12, {"mean": 0.5, "std": 0.2})
    assert set(seen) <= {"xz", "yz"} and seen


# -- TrainParams: the training run as one frozen, checked value (issue 17 item 14) ------------------

def test_train_params_are_the_command_line_defaults_and_frozen(tmp_path):
    import dataclasses

    from nbapp.training import TrainParams
    from nbapp.training.data import AugmentConfig

    p = TrainParams(raw="r.tif", labels="l.tif", out=str(tmp_path))
    args = add_arguments(argparse.ArgumentParser()).parse_args(
        ["--raw", "r.tif", "--labels", "l.tif", "--out", str(tmp_path)])
    assert TrainParams.from_args(args) == p
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.steps = 3
    # the augmentation defaults TrainParams exposes are AugmentConfig's
    aug = AugmentConfig()
    assert (p.zoom_out_max, p.zoom_in_max, p.pad_p, p.gamma) == \
        (aug.zoom_out_hi, 1 / aug.scale_lo, aug.pad_p, aug.gamma)
    q = p.replace(planes="yz,xy", arch='{"decoder_width": 8}', gamma=[0.8, 1.2])
    assert q.planes == ("xy", "yz") and q.arch == {"decoder_width": 8} and q.gamma == (0.8, 1.2)


@pytest.mark.parametrize("change, match", [
    ({"patch": 100}, "--patch must be a multiple"),
    ({"zoom_in_max": 0.5}, "--zoom-in-max"),
    ({"synthetic_p": 1.5}, "--synthetic-p must be a probability"),
    ({"gamma": (1.5, 0.7)}, "--gamma needs"),
    ({"zoom_out_max": 1.0}, "--zoom-out-max"),
    ({"planes": "xy,ab"}, "--planes must list"),
    ({"planes": "xy,xy"}, "--planes must list"),
    ({"arch": "{nope"}, "--arch must be a JSON object"),
    ({"arch": "[1]"}, "--arch must be a JSON object"),
    ({"arch": {"nope": 1}}, "unknown hyper-parameters"),
    ({"steps": 0}, "--steps must be at least 1"),
    ({"workers": -1}, "--workers must be >= 0"),
    ({"warmup": 1.0}, "--warmup must be in"),
    ({"time_limit": -1.0}, "--time-limit must be a number"),
])
def test_bad_train_params_are_refused_when_made(tmp_path, change, match):
    from nbapp.errors import ParameterError
    from nbapp.training import TrainParams

    with pytest.raises(ParameterError, match=match):
        TrainParams(raw="r.tif", labels="l.tif", out=str(tmp_path), **change)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*torch.jit.*:DeprecationWarning")
def test_run_takes_train_params(tmp_path):
    from nbapp.training import TrainParams
    from nbapp.training import run as run_params

    rp, lp = _volume_files(tmp_path)
    p = TrainParams(raw=str(rp), labels=str(lp), out=str(tmp_path / "p"), steps=2, batch_size=2,
                    patch=32, val_slices=4, val_every=1, val_stride=2, progress=False, threads=1,
                    arch=TINY)
    assert run_params(p) == 0
    assert (tmp_path / "p" / "nbapp_mito.pt").exists() and (tmp_path / "p" / "best.pth").exists()
