"""nbapp's default network: a compact Panoptic-DeepLab-style model for 1-channel EM.

The network is a small residual encoder (strides 2 to 32, depthwise-separable blocks, dilated
convolutions at 1/16 and 1/32), a feature-pyramid decoder back to 1/4 of the input, and three
heads on the 1/4 grid: semantic logits (refined at 1/2 with the stem features), centre heat-map
and offsets. It honours the model contract of SPEC.md section 1 and is TorchScript-scriptable.

Outputs for an input of shape (N, 1, H, W), H and W multiples of :data:`PADDING_FACTOR`:

- ``"sem_logits"``: (N, 1, H * s, W * s) logits of the single class, s = 2 ** (render_steps - 2)
  (bilinear beyond the input resolution: empanada asks for render_steps = 2 + log2(downsampling)
  and needs the semantic map back at the original image size);
- ``"ctr_hmp"``: (N, 1, H/4, W/4) raw centre heat-map, or (N, 1, H, W) if ``interpolate_ins``;
- ``"offsets"``: (N, 2, H/4, W/4) (dy, dx) to the object centre in input pixels, or
  (N, 2, H, W) if ``interpolate_ins`` (bilinear x4, values not rescaled).

Cell ``i`` of the 1/4 grid stands for input pixel coordinate ``4 * i + 1.5`` (consistent with
bilinear x4 upsampling with ``align_corners=False``).

>>> import torch
>>> net = build_model().eval()
>>> out = net(torch.zeros(1, 1, 64, 96), 2, False)
>>> [tuple(out[k].shape) for k in ("sem_logits", "ctr_hmp", "offsets")]
[(1, 1, 64, 96), (1, 1, 16, 24), (1, 2, 16, 24)]
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Tuple

import copy
import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = ["NBMitoNet", "build_model", "ARCH_DEFAULTS", "PADDING_FACTOR", "INPUT_NORM_MIN_STD",
           "standardise", "count_parameters",
           "fuse_batchnorm", "to_torchscript", "save_torchscript", "arch_of_export",
           "from_export", "recalibrate_batchnorm"]

#: H and W of the input must be multiples of this (the encoder reaches 1/32).
PADDING_FACTOR = 32

#: Default hyper-parameters of :func:`build_model` (stored in checkpoints).
ARCH_DEFAULTS: Dict[str, Any] = {
    "widths": [16, 32, 64, 160, 256],
    "depths": [0, 1, 3, 6, 3],
    "decoder_width": 64,
    "offset_scale": 16.0,
    "ctr_smooth": 0.0,
    "ctr_gate": False,
    "input_norm": False,
    "sem_smooth": 0.0,
}

#: Smallest standard deviation (normalised units, about 1.5 grey levels of uint8 data with the
#: default norms) that per-image standardisation divides by: a blank image is not amplified.
INPUT_NORM_MIN_STD = 0.05


def _resize(x: Tensor, size: List[int]) -> Tensor:
    """Bilinear resize with ``align_corners=False``, called as the bare ATen operator.

    ``F.interpolate`` compiles into TorchScript together with every mode of the torch that
    scripts it, and a graph naming an operator that an older torch lacks does not load there
    (torch 2.13's ``aten::_upsample_lanczos2d_aa`` breaks loading in torch 2.11, as seen on a
    GPU machine). The bare operator keeps the exported graph loadable from torch 1.13 on, which
    empanada-napari installs need.
    """
    return torch._C._nn.upsample_bilinear2d(x, size, False, None)


def _gaussian(sigma: float) -> Tuple[int, Tensor]:
    """``(radius, (1, 1, 2r + 1, 2r + 1) normalised Gaussian kernel)``, radius ``ceil(3 sigma)``;
    ``(0, [[1]])`` for ``sigma <= 0``."""
    radius = int(math.ceil(3 * sigma)) if sigma > 0 else 0
    g = torch.exp(-torch.arange(-radius, radius + 1, dtype=torch.float32) ** 2
                  / (2 * max(sigma, 1e-6) ** 2))
    g = g / g.sum()
    return radius, (g[:, None] * g[None, :])[None, None]


def _sigma_of(kernel: "Tensor | None", radius: int) -> float:
    """The sigma that :func:`_gaussian` made ``kernel`` with (0 for none)."""
    if radius <= 0 or kernel is None:
        return 0.0
    ratio = float(kernel[0, 0, radius, radius + 1] / kernel[0, 0, radius, radius])
    if not 0.0 < ratio < 1.0:  # g[r + 1] / g[r] = exp(-1 / (2 sigma^2))
        return 0.0
    return round(math.sqrt(-1.0 / (2.0 * math.log(ratio))), 4)


def _blur(x: Tensor, kernel: Tensor, radius: int) -> Tensor:
    """``x`` convolved with a :func:`_gaussian` kernel, edges replicated (size kept)."""
    r = radius
    return F.conv2d(torch._C._nn.replication_pad2d(x, [r, r, r, r]), kernel)


def standardise(x: Tensor, min_std: float = INPUT_NORM_MIN_STD) -> Tensor:
    """Per-image standardisation of a normalised batch (N, 1, H, W), padding left in place.

    Each image is shifted and scaled to mean 0 and standard deviation 1 over its non-padding
    pixels. Padding is the engine's zero fill (exactly 0 after normalisation; a real uint8 grey
    level never maps to exactly 0 with non-integer norms) and stays 0, the image's mean. This
    makes the network blind to global brightness and contrast: EM from other microscopes,
    stainings and detector settings reaches it with the contrast it was trained on.

    >>> x = torch.tensor([[[[0.0, 1.0, 3.0, 5.0]]]])
    >>> [round(v, 4) for v in standardise(x)[0, 0, 0].tolist()]
    [0.0, -1.2247, 0.0, 1.2247]
    """
    real = x != 0
    keep = real.to(x.dtype)
    count = keep.sum(dim=(1, 2, 3), keepdim=True).clamp(min=1.0)
    mean = (x * keep).sum(dim=(1, 2, 3), keepdim=True) / count
    var = (((x - mean) * keep) ** 2).sum(dim=(1, 2, 3), keepdim=True) / count
    y = (x - mean) / var.sqrt().clamp(min=min_std)
    return torch.where(real, y, torch.zeros_like(y))


class ConvBNReLU(nn.Sequential):
    """Dense k x k convolution, batch norm, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1, k: int = 3) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class SepConv(nn.Sequential):
    """Depthwise 3 x 3 (optionally strided or dilated) then pointwise 1 x 1, each with BN."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1,
                 last_relu: bool = True) -> None:
        layers: List[nn.Module] = [
            nn.Conv2d(cin, cin, 3, stride, dilation, dilation, groups=cin, bias=False),
            nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
            nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout),
        ]
        if last_relu:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class ResBlock(nn.Module):
    """Residual block of two depthwise-separable convolutions: ``relu(x + f(x))``."""

    def __init__(self, c: int, dilation: int = 1) -> None:
        super().__init__()
        self.f = nn.Sequential(SepConv(c, c, 1, dilation), SepConv(c, c, 1, 1, last_relu=False))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.f(x))


class NBMitoNet(nn.Module):
    """Compact Panoptic-DeepLab-style network (see the module docstring for the contract).

    Parameters
    ----------
    widths : list of 5 int
        Channels at strides 2, 4, 8, 16, 32.
    depths : list of 5 int
        Residual blocks after the downsampling at each stride.
    decoder_width : int
        Channels of the decoder at strides 4 to 32.
    offset_scale : float
        Fixed gain applied to the raw offset outputs (eases regression of offsets of tens of
        pixels).
    ctr_smooth : float
        Standard deviation, in 1/4-grid cells, of a fixed Gaussian blur of the centre heat-map
        (0 = none). Set at export to suppress small spurious peaks; no trainable weights.
    ctr_gate : bool
        Multiply the centre heat-map by the semantic probability pooled to the 1/4 grid, so
        that centres are only found on foreground.
    input_norm : bool
        Standardise each input image to mean 0 and standard deviation 1 over its non-padding
        pixels first (:func:`standardise`; no weights).
    sem_smooth : float
        Standard deviation, in pixels of the 1/2-resolution semantic map, of a fixed Gaussian
        blur of the semantic logits before they are resized to the output (0 = none). Set at
        export: it removes specks of a few pixels that would become tiny objects; no weights.
    """

    def __init__(self, widths: List[int], depths: List[int], decoder_width: int = 64,
                 offset_scale: float = 16.0, ctr_smooth: float = 0.0,
                 ctr_gate: bool = False, input_norm: bool = False,
                 sem_smooth: float = 0.0) -> None:
        super().__init__()
        self.input_norm = bool(input_norm)
        if len(widths) != 5 or len(depths) != 5:
            raise ValueError(f"widths and depths need 5 entries, got {widths} and {depths}")
        w, d, dw = widths, depths, decoder_width
        self.offset_scale = float(offset_scale)
        self.ctr_gate = bool(ctr_gate)
        self.ctr_radius, kernel = _gaussian(ctr_smooth)
        self.register_buffer("ctr_kernel", kernel, persistent=False)
        self.sem_radius, kernel = _gaussian(sem_smooth)
        self.register_buffer("sem_kernel", kernel, persistent=False)
        self.stem = ConvBNReLU(1, w[0], stride=2)
        dil = [1, 1, 1, 2, 2]
        stages: List[nn.Module] = []
        for i in range(1, 5):
            down: nn.Module = (ConvBNReLU(w[i - 1], w[i], stride=2) if i == 1
                               else SepConv(w[i - 1], w[i], stride=2))
            blocks = [ResBlock(w[i], dil[i] if (j % 2 == 1) else 1) for j in range(d[i])]
            stages.append(nn.Sequential(down, *blocks))
        self.stages = nn.ModuleList(stages)
        self.lat_top = nn.Sequential(nn.Conv2d(w[4], dw, 1, bias=False), nn.BatchNorm2d(dw))
        self.lateral = nn.ModuleList([nn.Sequential(nn.Conv2d(w[i], dw, 1, bias=False),
                                                    nn.BatchNorm2d(dw)) for i in (3, 2, 1)])
        self.context = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(w[4], dw, 1), nn.ReLU())
        self.smooth = nn.ModuleList([SepConv(dw, dw) for _ in range(3)])
        self.sem_head = nn.Sequential(SepConv(dw, dw), nn.Conv2d(dw, 8, 1))
        self.sem_refine = nn.Sequential(ConvBNReLU(8 + w[0], 8, k=1), nn.Conv2d(8, 1, 3, 1, 1))
        self.ins_head = nn.Sequential(SepConv(dw, dw), SepConv(dw, 32))
        self.ctr_out = nn.Conv2d(32, 1, 1)
        self.off_out = nn.Conv2d(32, 2, 1)
        nn.init.zeros_(self.ctr_out.bias)

    def forward(self, x: Tensor, render_steps: int = 2,
                interpolate_ins: bool = True) -> Dict[str, Tensor]:
        """Run the network.

        Parameters
        ----------
        x : (N, 1, H, W) float32 tensor
            Normalised image; H and W multiples of :data:`PADDING_FACTOR`.
        render_steps : int
            The semantic logits come at ``2 ** (render_steps - 2)`` times the input resolution
            (1 for the default 2; bilinear upsampling beyond it).
        interpolate_ins : bool
            Return the centre heat-map and offsets at input resolution instead of 1/4.

        Returns
        -------
        dict of str to Tensor
            ``sem_logits`` (N, 1, H * s, W * s), ``ctr_hmp`` (N, 1, h, w), ``offsets`` (N, 2, h, w),
            with (h, w) = (H/4, W/4), or (H, W) when ``interpolate_ins``.
        """
        h, w = x.shape[-2], x.shape[-1]
        if self.input_norm:
            x = standardise(x)
        s2 = self.stem(x)
        feats: List[Tensor] = []
        f = s2
        for stage in self.stages:
            f = stage(f)
            feats.append(f)
        p = self.lat_top(feats[3]) + self.context(feats[3])
        for i, (lat, sm) in enumerate(zip(self.lateral, self.smooth)):
            skip = feats[2 - i]
            p = _resize(p, [skip.shape[-2], skip.shape[-1]])
            p = sm(lat(skip) + p)
        sem4 = self.sem_head(p)
        sem2 = _resize(sem4, [s2.shape[-2], s2.shape[-1]])
        sem2 = self.sem_refine(torch.cat([sem2, s2], dim=1))
        if self.sem_radius > 0:
            sem2 = _blur(sem2, self.sem_kernel, self.sem_radius)
        sem = _resize(sem2, [h, w])
        ins = self.ins_head(p)
        ctr = self.ctr_out(ins)
        if self.ctr_radius > 0:
            ctr = _blur(ctr, self.ctr_kernel, self.ctr_radius)
        if self.ctr_gate:
            ctr = ctr * F.avg_pool2d(torch.sigmoid(sem), 4, 4)
        off = self.off_out(ins) * self.offset_scale
        if interpolate_ins:
            ctr = _resize(ctr, [h, w])
            off = _resize(off, [h, w])
        scale = 1
        for _ in range(render_steps - 2):
            scale = scale * 2
        if scale > 1:  # rendered finer than the input (from the 1/2 map, not the upsampled one)
            sem = _resize(sem2, [h * scale, w * scale])
        return {"sem_logits": sem, "ctr_hmp": ctr, "offsets": off}


def build_model(**hparams: Any) -> NBMitoNet:
    """Build an :class:`NBMitoNet` from :data:`ARCH_DEFAULTS` updated with ``hparams``."""
    unknown = set(hparams) - set(ARCH_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown architecture hyper-parameters {sorted(unknown)}; "
                         f"known: {sorted(ARCH_DEFAULTS)}")
    cfg = {**ARCH_DEFAULTS, **hparams}
    return NBMitoNet(list(cfg["widths"]), list(cfg["depths"]), int(cfg["decoder_width"]),
                     float(cfg["offset_scale"]), float(cfg["ctr_smooth"]), bool(cfg["ctr_gate"]),
                     bool(cfg["input_norm"]), float(cfg["sem_smooth"]))


def count_parameters(model: nn.Module) -> int:
    """Number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


def fuse_batchnorm(model: nn.Module) -> nn.Module:
    """Return an eval-mode copy of ``model`` with each Conv2d + BatchNorm2d pair folded into one
    conv.

    The copy computes the same function in eval mode (up to float rounding), runs faster on
    CPU and keeps its weights as parameters, so ``.to(device)`` still moves them.
    """
    fused = copy.deepcopy(model).eval()
    for _, seq, i in _conv_bn_pairs(fused):
        seq[i] = fuse_conv_bn_eval(seq[i], seq[i + 1])
        seq[i + 1] = nn.Identity()
    return fused


def to_torchscript(model: nn.Module) -> torch.jit.ScriptModule:
    """Script an eval-mode, batch-norm-folded copy of ``model`` for shipping (CPU).

    TorchScript is what MitoNet-compatible tools load; torch >= 2.10 marks ``torch.jit`` as
    deprecated, so that warning is silenced here, deliberately and only here.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.*", category=DeprecationWarning)
        return torch.jit.script(fuse_batchnorm(model).cpu())


def save_torchscript(model: nn.Module, path: "str | Path") -> None:
    """Write :func:`to_torchscript` of ``model`` to ``path``."""
    scripted = to_torchscript(model)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.*", category=DeprecationWarning)
        torch.jit.save(scripted, str(path))


def _conv_bn_pairs(model: nn.Module) -> List[Tuple[str, nn.Sequential, int]]:
    """``(state-dict prefix of the conv, sequential, index of the conv)`` for each Conv2d
    directly followed by a BatchNorm2d inside an ``nn.Sequential``: the pairs that
    :func:`fuse_batchnorm` folds and :func:`from_export` unfolds."""
    pairs: List[Tuple[str, nn.Sequential, int]] = []
    for name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        for i in range(len(seq) - 1):
            if isinstance(seq[i], nn.Conv2d) and isinstance(seq[i + 1], nn.BatchNorm2d):
                pairs.append((f"{name}.{i}" if name else str(i), seq, i))
    return pairs


def arch_of_export(scripted: nn.Module) -> Dict[str, Any]:
    """The :func:`build_model` hyper-parameters of a network saved by :func:`save_torchscript`.

    They are read from the export's weight shapes and attributes. Raises ``ValueError`` for
    any other model (MitoNet, a user's own network), whose weights nbapp cannot train.
    """
    name = getattr(scripted, "original_name", type(scripted).__name__)
    if name != "NBMitoNet":
        raise ValueError(f"it holds a {name}, not an nbapp NBMitoNet export; only models "
                         "exported by nbapp (the default or `nbapp train` output) can be "
                         "trained further")
    sd = scripted.state_dict()
    widths, depths = [int(sd["stem.0.weight"].shape[0])], [0]
    for i in range(4):
        keys = [k for k in sd if k.startswith(f"stages.{i}.")]
        first = [k for k in keys if k.startswith(f"stages.{i}.0.") and k.endswith(".weight")]
        widths.append(int(sd[first[-1]].shape[0]))  # the last conv of the downsampling
        depths.append(len({k.split(".")[2] for k in keys}) - 1)
    ctr_smooth = _sigma_of(sd.get("ctr_kernel"), int(getattr(scripted, "ctr_radius", 0)))
    sem_smooth = _sigma_of(sd.get("sem_kernel"), int(getattr(scripted, "sem_radius", 0)))
    return {"widths": widths, "depths": depths,
            "decoder_width": int(sd["lat_top.0.weight"].shape[0]),
            "offset_scale": float(getattr(scripted, "offset_scale")), "ctr_smooth": ctr_smooth,
            "ctr_gate": bool(getattr(scripted, "ctr_gate")),
            "input_norm": bool(getattr(scripted, "input_norm")), "sem_smooth": sem_smooth}


def from_export(scripted: nn.Module) -> Tuple[NBMitoNet, Dict[str, Any]]:
    """A trainable :class:`NBMitoNet` holding the weights of an nbapp TorchScript export.

    The export has each batch norm folded into its convolution. Here each folded convolution
    becomes the unbiased convolution (the folded weights) followed by a batch norm that only adds
    the folded bias (unit statistics), so the returned model computes the export's function in
    eval mode, up to float rounding. Those statistics are not the activations' own: call
    :func:`recalibrate_batchnorm` on real inputs before training in train mode.

    Returns ``(model in eval mode, architecture hyper-parameters as in checkpoints)``.
    """
    arch = arch_of_export(scripted)
    model = build_model(**arch).eval()
    sd = {k: v.detach().cpu() for k, v in scripted.state_dict().items()
          if k not in ("ctr_kernel", "sem_kernel")}
    want = fuse_batchnorm(model).state_dict()
    wrong = sorted(set(sd) ^ set(want)) + [k for k in sd if k in want
                                             and sd[k].shape != want[k].shape]
    if wrong:
        raise ValueError(f"its weights do not fit the NBMitoNet {arch} read from it "
                         f"(first mismatch: {wrong[0]})")
    with torch.no_grad():
        for prefix, seq, i in _conv_bn_pairs(model):
            conv, bn = seq[i], seq[i + 1]
            conv.weight.copy_(sd.pop(prefix + ".weight"))
            bn.bias.copy_(sd.pop(prefix + ".bias"))
            bn.weight.fill_(1.0)
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)
    model.load_state_dict(sd, strict=False)  # the pairs' keys were set above
    return model, arch


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[Tensor]) -> int:
    """Give every batch norm of ``model`` the running statistics of its real inputs.

    The statistics are those of ``batches`` (normalised (N, 1, H, W) images) in eval mode; each
    layer's weight and bias are changed with them so that the eval-mode function stays the
    same (up to float rounding). Train mode, which normalises with the statistics of each batch,
    then starts from that function too. Returns the number of images seen.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    sums: Dict[nn.Module, List[Any]] = {bn: [0, 0.0, 0.0] for bn in norms}

    def record(bn: nn.Module, inputs: Tuple[Tensor, ...]) -> None:
        x, s = inputs[0].detach().double(), sums[bn]
        s[0] += x.numel() // x.shape[1]
        s[1] = s[1] + x.sum(dim=(0, 2, 3))
        s[2] = s[2] + (x * x).sum(dim=(0, 2, 3))

    handles = [bn.register_forward_pre_hook(record) for bn in norms]
    training, seen = model.training, 0
    model.eval()
    try:
        for x in batches:
            model(x)
            seen += int(x.shape[0])
    finally:
        for h in handles:
            h.remove()
        model.train(training)
    if seen == 0:
        raise ValueError("recalibrate_batchnorm needs at least one batch of images")
    for bn in norms:
        count, s1, s2 = sums[bn]
        mean = s1 / count
        var = (s2 / count - mean * mean).clamp(min=0.0)
        scale = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
        shift = bn.bias.double() - bn.running_mean.double() * scale
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        bn.weight.copy_(scale * (var + bn.eps).sqrt())
        bn.bias.copy_(shift + mean * scale)
    return seen
