"""Tests of the default network (nbapp.models.arch): model contract, TorchScript, size, training."""

from pathlib import Path

import pytest
import torch

from nbapp.models.arch import (ARCH_DEFAULTS, PADDING_FACTOR, build_model, count_parameters,
                               fuse_batchnorm, save_torchscript, to_torchscript)

# torch >= 2.10 deprecates torch.jit; TorchScript is still the MitoNet model format.
JIT_LOAD_OK = pytest.mark.filterwarnings("ignore:.*torch.jit.*:DeprecationWarning")

SHIPPED = Path(__file__).resolve().parents[1] / "nbapp" / "models" / "default" / "nbapp_mito.pt"


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return build_model().eval()


@pytest.mark.parametrize("interpolate_ins", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 64, 64), (2, 1, 96, 160)])
def test_contract_shapes(net, shape, interpolate_ins):
    n, _, h, w = shape
    with torch.inference_mode():
        out = net(torch.randn(shape), 2, interpolate_ins)
    assert set(out) == {"sem_logits", "ctr_hmp", "offsets"}
    hh, ww = (h, w) if interpolate_ins else (h // 4, w // 4)
    assert out["sem_logits"].shape == (n, 1, h, w)
    assert out["ctr_hmp"].shape == (n, 1, hh, ww)
    assert out["offsets"].shape == (n, 2, hh, ww)
    assert all(v.dtype == torch.float32 for v in out.values())


def test_interpolated_heads_are_bilinear_x4_of_coarse(net):
    x = torch.randn(1, 1, 64, 96)
    with torch.inference_mode():
        coarse, fine = net(x, 2, False), net(x, 2, True)
    for key in ("ctr_hmp", "offsets"):
        up = torch.nn.functional.interpolate(coarse[key], scale_factor=4, mode="bilinear",
                                             align_corners=False)
        torch.testing.assert_close(fine[key], up)
    torch.testing.assert_close(fine["sem_logits"], coarse["sem_logits"])


def test_render_steps_scale_the_semantic_map(net):
    """sem_logits come at 2 ** (render_steps - 2) x the input (empanada-napari relies on it to
    return to the original size after downsampling); the instance heads do not change."""
    x = torch.randn(1, 1, 32, 32)
    with torch.inference_mode():
        a = net(x)
        b = net(x, 4, True)
    assert a["ctr_hmp"].shape == b["ctr_hmp"].shape == (1, 1, 32, 32)
    assert a["sem_logits"].shape == (1, 1, 32, 32) and b["sem_logits"].shape == (1, 1, 128, 128)
    # the same map, rendered finer: area-averaged back to 32 x 32 it is the default one
    down = torch.nn.functional.avg_pool2d(b["sem_logits"], 4)
    assert torch.corrcoef(torch.stack([down.flatten(), a["sem_logits"].flatten()]))[0, 1] > 0.99
    torch.testing.assert_close(a["offsets"], b["offsets"])


@JIT_LOAD_OK
@pytest.mark.parametrize("fine", [False, True])
def test_shipped_model_renders_for_downsampling(fine):
    """The shipped export (heat-map gated by the foreground) at render_steps 3 and 4, as the
    engine and empanada call it for downsampling 2 and 4."""
    model = torch.jit.load(str(SHIPPED))
    x = torch.randn(1, 1, 64, 96)
    with torch.inference_mode():
        base = model(x, 2, fine)
        for steps, s in ((3, 2), (4, 4)):
            out = model(x, steps, fine)
            assert out["sem_logits"].shape == (1, 1, 64 * s, 96 * s)
            torch.testing.assert_close(out["ctr_hmp"], base["ctr_hmp"])
            torch.testing.assert_close(out["offsets"], base["offsets"])


@JIT_LOAD_OK
def test_torchscript_round_trip_and_fused_equivalence(net, tmp_path):
    path = tmp_path / "m.pt"
    save_torchscript(net, path)
    loaded = torch.jit.load(str(path))
    x = torch.randn(2, 1, 64, 64)
    with torch.inference_mode():
        ref = net(x, 2, False)
        got = loaded(x, 2, False)
        got_fine = loaded(x, render_steps=3, interpolate_ins=True)
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-4, atol=1e-4)
    assert got_fine["offsets"].shape == (2, 2, 64, 64)
    assert got_fine["sem_logits"].shape == (2, 1, 128, 128)


def test_size_limits(net, tmp_path):
    n = count_parameters(net)
    assert 200_000 <= n <= 4_000_000
    fused = fuse_batchnorm(net)
    assert count_parameters(fused) < n
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert isinstance(to_torchscript(net), torch.jit.ScriptModule)
    save_torchscript(net, tmp_path / "m.pt")
    assert (tmp_path / "m.pt").stat().st_size <= 15 * 2**20
    assert PADDING_FACTOR in (16, 32)


def test_build_model_rejects_unknown_hyperparameters():
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model(depth=3)
    with pytest.raises(ValueError, match="5 entries"):
        build_model(widths=[8, 16])
    assert build_model(**ARCH_DEFAULTS) is not None


def test_train_steps_reduce_loss():
    from nbapp.train import panoptic_loss

    torch.manual_seed(0)
    model = build_model(widths=[8, 8, 16, 16, 16], depths=[0, 1, 1, 1, 1], decoder_width=16)
    model.train()
    x = torch.randn(2, 1, 64, 64)
    sem = torch.zeros(2, 1, 64, 64)
    sem[:, :, 16:40, 20:44] = 1
    heat = torch.zeros(2, 1, 64, 64)
    heat[:, :, 28, 32] = 1
    offsets = torch.zeros(2, 2, 64, 64)
    batch = {"image": x + 2 * sem, "semantic": sem, "heatmap": heat, "offsets": offsets,
             "fg": sem > 0}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss, _ = panoptic_loss(model(batch["image"], 2, False), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@JIT_LOAD_OK
@pytest.mark.skipif(not SHIPPED.exists(), reason="shipped default model not built yet")
def test_shipped_model_contract():
    model = torch.jit.load(str(SHIPPED))
    model.eval()
    with torch.inference_mode():
        out = model(torch.zeros(1, 1, 64, 64), 2, False)
    assert out["sem_logits"].shape == (1, 1, 64, 64)
    assert out["offsets"].shape == (1, 2, 16, 16)
    assert SHIPPED.stat().st_size <= 15 * 2**20


def test_export_heatmap_smoothing_and_gating():
    torch.manual_seed(0)
    plain = build_model().eval()
    shipped = build_model(ctr_smooth=1.0, ctr_gate=True).eval()
    shipped.load_state_dict(plain.state_dict())
    x = torch.randn(1, 1, 64, 64)
    with torch.inference_mode():
        a, b = plain(x, 2, False), shipped(x, 2, False)
        c = to_torchscript(shipped)(x, 2, True)
    torch.testing.assert_close(a["sem_logits"], b["sem_logits"])
    torch.testing.assert_close(a["offsets"], b["offsets"])
    assert b["ctr_hmp"].shape == (1, 1, 16, 16) and c["ctr_hmp"].shape == (1, 1, 64, 64)
    prob = torch.nn.functional.avg_pool2d(torch.sigmoid(a["sem_logits"]), 4)
    assert torch.all(b["ctr_hmp"].abs() <= a["ctr_hmp"].abs().max() * prob.max() + 1e-6)


def test_export_semantic_smoothing_removes_specks_and_keeps_objects():
    torch.manual_seed(0)
    plain = build_model().eval()
    smooth = build_model(sem_smooth=1.0).eval()
    smooth.load_state_dict(plain.state_dict())
    x = torch.randn(1, 1, 64, 64)
    with torch.inference_mode():
        a, b = plain(x, 3, False), smooth(x, 3, False)
    torch.testing.assert_close(a["offsets"], b["offsets"])  # only the semantic map changes
    torch.testing.assert_close(a["ctr_hmp"], b["ctr_hmp"])
    assert b["sem_logits"].shape == (1, 1, 128, 128)  # render_steps still renders finer
    assert float(b["sem_logits"].std()) < float(a["sem_logits"].std())
    # on the 1/2 map: a one-pixel speck falls below 0, a disc of radius 6 keeps its centre
    half = torch.full((1, 1, 32, 32), -4.0)
    half[0, 0, 5, 5] = 6.0
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    half[0, 0][(yy - 20) ** 2 + (xx - 20) ** 2 <= 36] = 6.0
    r = smooth.sem_radius
    out = torch.nn.functional.conv2d(torch.nn.functional.pad(half, [r] * 4, mode="replicate"),
                                     smooth.sem_kernel)
    assert out[0, 0, 5, 5] < 0 < out[0, 0, 20, 20]
    assert ((out[0, 0] > 0) == (half[0, 0] > 0))[15:26, 15:26].float().mean() > 0.9


def test_shipped_model_smooths_its_semantic_map():
    from nbapp.models.arch import arch_of_export

    arch = arch_of_export(torch.jit.load(str(SHIPPED)))
    assert arch["sem_smooth"] == 1.0 and arch["ctr_smooth"] == 1.0 and arch["ctr_gate"]


# Operators every torch from 1.13 on knows. F.interpolate and F.pad would script into the
# running torch's full implementation, naming operators an older torch cannot load
# (torch 2.13's aten::_upsample_lanczos2d_aa did not load in torch 2.11 on a GPU machine).
PORTABLE_OPS = {
    "aten::__getitem__", "aten::adaptive_avg_pool2d", "aten::add", "aten::append",
    "aten::avg_pool2d", "aten::cat", "aten::conv2d", "aten::gt", "aten::len", "aten::mul",
    "aten::relu", "aten::relu_", "aten::replication_pad2d", "aten::sigmoid", "aten::size",
    "aten::upsample_bilinear2d", "prim::Constant", "prim::DictConstruct", "prim::GetAttr",
    "prim::If", "prim::ListConstruct", "prim::Loop", "prim::RaiseException", "aten::sub",
    # per-image standardisation (input_norm)
    "aten::ne", "aten::to", "aten::sum", "aten::clamp", "aten::div", "aten::pow", "aten::sqrt",
    "aten::where", "aten::zeros_like", "prim::dtype",
}


def _ops(graph, acc=None):
    acc = set() if acc is None else acc
    for node in graph.nodes():
        acc.add(node.kind())
        for block in node.blocks():
            _ops(block, acc)
    return acc


@pytest.mark.filterwarnings("ignore:.*torch.jit.*:DeprecationWarning")
def test_shipped_model_uses_only_portable_operators():
    ops = _ops(torch.jit.load(str(SHIPPED)).inlined_graph)
    assert ops <= PORTABLE_OPS, f"not portable: {sorted(ops - PORTABLE_OPS)}"
    assert "aten::upsample_bilinear2d" in ops and "aten::replication_pad2d" in ops


@pytest.mark.filterwarnings("ignore:.*torch.jit.*:DeprecationWarning")
def test_functional_interpolate_would_not_be_portable():
    class Up(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.interpolate(x, scale_factor=2.0, mode="bilinear")

    ops = _ops(torch.jit.script(Up()).inlined_graph)
    assert not ops <= PORTABLE_OPS  # the check above can fail


def test_input_norm_makes_the_network_blind_to_brightness_and_contrast():
    torch.manual_seed(0)
    net = build_model(input_norm=True).eval()
    x = torch.randn(1, 1, 64, 96) * 0.8 + 0.3
    x[..., 48:, :] = 0.0  # the engine's zero padding
    y = x * 0.2 - 1.1  # a dimmer, flatter microscope
    y[..., 48:, :] = 0.0
    with torch.inference_mode():
        a, b = net(x, 2, False), net(y, 2, False)
        plain = build_model().eval()
        plain.load_state_dict(net.state_dict())
        c = plain(y, 2, False)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4)
    assert (a["sem_logits"] - c["sem_logits"]).abs().max() > 1e-2  # without it, not blind
    scripted = to_torchscript(net)
    torch.testing.assert_close(scripted(y, 2, False)["sem_logits"], a["sem_logits"],
                               atol=1e-4, rtol=1e-4)


def test_standardise_leaves_padding_and_does_not_amplify_a_blank_image():
    from nbapp.models.arch import INPUT_NORM_MIN_STD, standardise

    x = torch.zeros(2, 1, 8, 8)
    x[0, :, :, :6] = torch.linspace(-2, 3, 48).reshape(8, 6)
    x[1] = 0.7 + 0.001 * torch.randn(1, 8, 8)  # nearly blank
    y = standardise(x)
    real = y[0, 0, :, :6]
    assert torch.all(y[0, 0, :, 6:] == 0)
    assert abs(real.mean().item()) < 1e-5 and abs(real.std(unbiased=False).item() - 1) < 1e-4
    assert y[1].std().item() == pytest.approx(0.001 / INPUT_NORM_MIN_STD, rel=0.2)
