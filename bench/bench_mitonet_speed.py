"""Speed of nbapp's default model against a MitoNet_v1-architecture network, 512x512, this CPU.

The claim checked: the whole 2D inference of one 512x512 slice with nbapp's default model
(network + post-processing, on a new image, i.e. a cache miss) is at least 10x faster than the
MitoNet_v1 network's forward pass alone on the same machine.

MitoNet_v1's weights cannot be downloaded here, so this script builds, with plain ``torch.nn``
(no torchvision), a network with MitoNet_v1's architecture and **random weights**. Speed does not
depend on the weights (the batch-norm statistics are set once from a random input so that the
activations have a realistic scale: no overflow, no denormals). Nothing here measures accuracy.

Architecture (facts from volume-em/empanada and volume-em/empanada-napari, see ``MITONET_V1``):
PanopticDeepLabPR = ResNet-50 encoder (bottlenecks 3-4-6-3, 1-channel 7x7 stem, output stride
16: the last stage is dilated, not strided) -> two Panoptic-DeepLab decoders (semantic and
instance; each: ASPP with rates 2, 4, 6 on the 1/16 features + one skip from the 1/4 features
projected to 32 (semantic) or 16 (instance) channels, fused by a 5x5 depthwise-separable conv
to 256 channels) -> heads (5x5 separable conv + 1x1 conv): semantic logits, centre heat-map and
offsets at 1/4 -> PointRend at inference: ``render_steps`` times, upsample the semantic logits
x2 and re-predict the 8192 most uncertain points with an MLP (3 x 256 fc + predictor, coarse
logits appended to every layer) from the 1/4 decoder features and the coarse logits. About
55 M parameters. Its forward follows nbapp's model contract:
``forward(x, render_steps=2, interpolate_ins=True) -> {"sem_logits", "ctr_hmp", "offsets"}``.

Timed, interleaved in rounds (``timeit`` of bench_2d.py), torch's default threads, batch 1,
``torch.inference_mode()``, eval mode, 1x1x512x512 input:

- MitoNet_v1-arch forward, eager (render_steps=2, interpolate_ins=False);
- the same, TorchScript-scripted with batch norms folded into the convolutions
  (``torch.jit.script`` + ``torch.jit.freeze``): how MitoNet_v1 ships (empanada's
  scripts/export_model.py fuses conv+BN(+ReLU) and scripts the model);
- nbapp whole 2D inference: ``SliceSegmenter(load_model("default"))(image ^ k, SliceParams())``
  with k changing each call (cache miss: normalisation, network, post-processing);
- nbapp network alone: ``Engine(model).infer(image[None])``.

The image is a 512x512 crop of a Lucchi++ slice when ../shared/data/lucchi_pp_train is present
(``NBAPP_DATA`` to move it), else of nbapp's synthetic demo volume. Prints a table and writes
``bench/results/bench_mitonet_speed.json`` (machine, parameters, medians, IQRs, ratios).

Each round runs every function once after one warm-up call (``--rounds``: fewer, longer
rounds), so that the load of a shared machine hits all alike; medians and IQRs are reported.

Run: ``python bench/bench_mitonet_speed.py [--repeats N] [--rounds R] [--no-script]`` (about a
minute with the default 9 repeats on 2 idle CPU cores; several on a busy machine).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
DATA = Path(os.environ.get("NBAPP_DATA", HERE.parents[1] / "shared" / "data"))

from bench_2d import machine, timeit  # noqa: E402

#: MitoNet_v1's architecture settings and where they come from.
MITONET_V1 = {
    "arch": "PanopticDeepLabPR",
    "encoder": "resnet50 (Bottleneck, layers 3-4-6-3, in_channels=1, 7x7/2 stem + 3x3/2 max-pool)",
    "stage4_stride": 16,
    "decoder_channels": 256,
    "low_level_stages": [1],
    "low_level_channels_project": [32],
    "atrous_rates": [2, 4, 6],
    "aspp_channels": 256,
    "ins_decoder": True,
    "ins_ratio": 0.5,
    "num_fc": 3,
    "subdivision_steps": 2,
    "subdivision_num_points": 8192,
    "padding_factor": 16,
    "sources": {
        "model settings": "volume-em/empanada-napari empanada_napari/training/pdl_model.yaml; "
                          "volume-em/empanada projects/mitonet/configs/mmm_panoptic_deeplab_pointrend.yaml",
        "padding factor, TorchScript release": "volume-em/empanada-napari empanada_napari/configs/MitoNet_v1.yaml",
        "ResNet-50 encoder (1-channel stem, output stride 16 by dilating layer4)":
            "volume-em/empanada-napari empanada/models/encoders/resnet.py",
        "model assembly, PointRend at eval": "volume-em/empanada empanada/models/panoptic_deeplab.py",
        "decoder (ASPP + skip projection + 5x5 separable fuse)":
            "volume-em/empanada empanada/models/decoders/panoptic_deeplab.py, decoders/aspp.py",
        "heads": "volume-em/empanada empanada/models/heads.py, blocks.py",
        "PointRend head and subdivision inference": "volume-em/empanada empanada/models/point_rend.py",
        "export (fuse conv+BN, torch.jit.script)": "volume-em/empanada scripts/export_model.py",
    },
}


# --------------------------------------------------------------------------------------------
# MitoNet_v1 architecture, random weights (written for this benchmark)
# --------------------------------------------------------------------------------------------

def _cbr(cin: int, cout: int, k: int = 1, stride: int = 1, dilation: int = 1, groups: int = 1,
         relu: bool = True) -> nn.Sequential:
    """Conv (no bias) + batch norm (+ ReLU)."""
    pad = dilation * (k - 1) // 2
    layers: List[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride, pad, dilation=dilation, groups=groups, bias=False),
        nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _sep5(cin: int, cout: int) -> nn.Sequential:
    """5x5 depthwise conv, 1x1 pointwise conv, batch norm, ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cin, 5, padding=2, groups=cin, bias=False),
                         nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: 1x1 reduce, 3x3 (carries the stride/dilation), 1x1 expand x4."""

    def __init__(self, cin: int, mid: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        cout = 4 * mid
        self.body = nn.Sequential(_cbr(cin, mid, 1), _cbr(mid, mid, 3, stride, dilation),
                                  _cbr(mid, cout, 1, relu=False))
        self.short = (_cbr(cin, cout, 1, stride, relu=False) if stride != 1 or cin != cout
                      else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.body(x) + self.short(x))


class ResNet50Encoder(nn.Module):
    """1-channel ResNet-50; returns features at 1/4 (pool), 1/4, 1/8, 1/16, 1/16 or 1/32."""

    def __init__(self, output_stride: int = 16) -> None:
        super().__init__()
        self.stem = _cbr(1, 64, 7, stride=2)
        self.pool = nn.MaxPool2d(3, 2, 1)
        stages = []
        cin = 64
        for i, (mid, n) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
            stride = 1 if i == 0 else 2
            dilation = 1
            if i == 3 and output_stride == 16:
                stride, dilation = 1, 2
            blocks = [Bottleneck(cin, mid, stride, dilation)]
            blocks += [Bottleneck(4 * mid, mid, 1, dilation) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = 4 * mid
        self.stages = nn.ModuleList(stages)
        self.widths = [256, 512, 1024, 2048]

    def forward(self, x: Tensor) -> List[Tensor]:
        x = self.pool(self.stem(x))
        feats = [x]
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class ASPP(nn.Module):
    """1x1 branch, three dilated 3x3 branches, image pooling branch; 1x1 projection."""

    def __init__(self, cin: int, cout: int, rates: List[int]) -> None:
        super().__init__()
        branches = [_cbr(cin, cout, 1)] + [_cbr(cin, cout, 3, dilation=r) for r in rates]
        self.branches = nn.ModuleList(branches)
        self.pool_conv = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.ReLU(inplace=True))
        self.project = nn.Sequential(_cbr((len(rates) + 2) * cout, cout, 1), nn.Dropout(0.5))

    def forward(self, x: Tensor) -> Tensor:
        outs = [b(x) for b in self.branches]
        g = self.pool_conv(F.adaptive_avg_pool2d(x, 1))
        outs.append(g.expand(-1, -1, x.shape[-2], x.shape[-1]))
        return self.project(torch.cat(outs, 1))


class SkipFuse(nn.Module):
    """Project a skip feature, upsample the coarse path to it, concatenate, 5x5 separable fuse."""

    def __init__(self, level: int, cskip: int, cproj: int, cin: int, cout: int) -> None:
        super().__init__()
        self.level = level
        self.proj = _cbr(cskip, cproj, 1)
        self.fuse = _sep5(cin + cproj, cout)

    def forward(self, x: Tensor, feats: List[Tensor]) -> Tensor:
        skip = self.proj(feats[self.level])
        x = F.interpolate(x, size=(skip.shape[-2], skip.shape[-1]), mode="bilinear",
                          align_corners=True)
        return self.fuse(torch.cat([x, skip], 1))


class PDLDecoder(nn.Module):
    def __init__(self, widths: List[int], levels: List[int], proj: List[int], ch: int,
                 rates: List[int]) -> None:
        super().__init__()
        self.aspp = ASPP(widths[-1], ch, rates)
        self.skips = nn.ModuleList([SkipFuse(lv, widths[lv - 1], p, ch, ch)
                                    for lv, p in zip(levels, proj)])

    def forward(self, feats: List[Tensor]) -> Tensor:
        x = self.aspp(feats[-1])
        for s in self.skips:
            x = s(x, feats)
        return x


class PointMLP(nn.Module):
    """Per-point MLP (1x1 conv1d); the coarse logits are appended to the input of every layer."""

    def __init__(self, cfeat: int, ncls: int, width: int, nfc: int) -> None:
        super().__init__()
        fcs = []
        cin = cfeat + ncls
        for _ in range(nfc):
            fcs.append(nn.Conv1d(cin, width, 1))
            cin = width + ncls
        self.fcs = nn.ModuleList(fcs)
        self.out = nn.Conv1d(cin, ncls, 1)

    def forward(self, fine: Tensor, coarse: Tensor) -> Tensor:
        x = torch.cat([fine, coarse], 1)
        for fc in self.fcs:
            x = torch.cat([F.relu(fc(x)), coarse], 1)
        return self.out(x)


def _sample(t: Tensor, xy: Tensor) -> Tensor:
    """Bilinear samples (N, C, P) of ``t`` at points ``xy`` (N, P, 2) in [0, 1] (x, y)."""
    return F.grid_sample(t, 2.0 * xy[:, :, None] - 1.0, mode="bilinear",
                         align_corners=False)[..., 0]


class MitoNetV1Arch(nn.Module):
    """Panoptic-DeepLab + PointRend on ResNet-50 with MitoNet_v1's settings (random weights)."""

    def __init__(self, num_points: int = 8192) -> None:
        super().__init__()
        c = MITONET_V1
        ch = int(c["decoder_channels"])
        rates = list(c["atrous_rates"])
        levels = list(c["low_level_stages"])
        proj = list(c["low_level_channels_project"])
        self.encoder = ResNet50Encoder(int(c["stage4_stride"]))
        w = self.encoder.widths
        self.sem_decoder = PDLDecoder(w, levels, proj, ch, rates)
        self.ins_decoder = PDLDecoder(w, levels, [int(p * c["ins_ratio"]) for p in proj], ch, rates)
        self.sem_head = nn.Sequential(_sep5(ch, ch), nn.Conv2d(ch, 1, 1))
        self.ctr_head = nn.Sequential(_sep5(ch, ch), nn.Conv2d(ch, 1, 1))
        self.off_head = nn.Sequential(_sep5(ch, ch), nn.Conv2d(ch, 2, 1))
        self.point_head = PointMLP(ch, 1, ch, int(c["num_fc"]))
        self.num_points = num_points

    def render(self, coarse: Tensor, feats: Tensor, steps: int) -> Tensor:
        """PointRend subdivision: ``steps`` x (upsample x2, re-predict the most uncertain
        points from fine features + coarse logits, write them back)."""
        logits = coarse
        for _ in range(steps):
            logits = F.interpolate(logits, scale_factor=2.0, mode="bilinear", align_corners=False)
            n, c, h, w = logits.shape
            flat = logits.reshape(n, c, h * w)
            k = min(self.num_points, h * w)
            idx = torch.topk(-flat.abs().amax(1), k, dim=1)[1]  # least confident first
            xy = torch.stack([(idx % w).float() + 0.5, torch.div(idx, w, rounding_mode="floor")
                              .float() + 0.5], -1) / torch.tensor([float(w), float(h)])
            pts = self.point_head(_sample(feats, xy), _sample(coarse, xy))
            flat = flat.scatter(2, idx[:, None].expand(-1, c, -1), pts)
            logits = flat.view(n, c, h, w)
        return logits

    def forward(self, x: Tensor, render_steps: int = 2,
                interpolate_ins: bool = True) -> Dict[str, Tensor]:
        feats = self.encoder(x)
        sem_x = self.sem_decoder(feats)
        ins_x = self.ins_decoder(feats)
        coarse = self.sem_head(sem_x)
        ctr = self.ctr_head(ins_x)
        off = self.off_head(ins_x)
        sem = self.render(coarse, sem_x, render_steps)
        if interpolate_ins:
            ctr = F.interpolate(ctr, scale_factor=4.0, mode="bilinear", align_corners=True)
            off = F.interpolate(off, scale_factor=4.0, mode="bilinear", align_corners=True)
        return {"sem_logits": sem, "ctr_hmp": ctr, "offsets": off}


def build_mitonet_arch(seed: int = 0) -> MitoNetV1Arch:
    """The network with random weights and batch-norm statistics of one random input."""
    torch.manual_seed(seed)
    net = MitoNetV1Arch()
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv1d)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            m.momentum = 1.0  # the one calibration pass below sets the running statistics
    net.train()
    with torch.no_grad():
        net(torch.randn(1, 1, 256, 256), render_steps=0)
    return net.eval()


def script_and_fold(net: nn.Module) -> torch.jit.ScriptModule:
    """TorchScript with batch norms folded into the convolutions (``torch.jit.freeze``)."""
    return torch.jit.freeze(torch.jit.script(net.eval()))


# --------------------------------------------------------------------------------------------

def test_image() -> tuple[np.ndarray, str]:
    """A 512x512 uint8 EM image: the Lucchi++ crop with the most mitochondria (z=48,
    [0:512, 512:1024], 13 in the ground truth) when present, else the synthetic demo volume."""
    raw = DATA / "lucchi_pp_train" / "train_raw.tif"
    if raw.exists():
        import tifffile

        with tifffile.TiffFile(raw) as tf:
            img = tf.pages[48].asarray()
        return (np.ascontiguousarray(img[:512, 512:1024]).astype(np.uint8),
                "Lucchi++ train_raw z=48, [0:512, 512:1024]")
    from nbapp.samples import demo_volume

    img = demo_volume(shape=(3, 512, 512), n_mito=12, seed=7)[0][1]
    return np.ascontiguousarray(img), "nbapp demo_volume(shape=(3, 512, 512), n_mito=12, seed=7)[1]"


def recorded(fns: dict) -> tuple[dict, dict]:
    """Wrap each function so that every call's duration is kept (``timeit`` keeps only
    summaries): gives the best time and ratios of calls made in the same round."""
    samples: dict = {name: [] for name in fns}

    def wrap(name, fn):
        def call():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
        return call

    return {name: wrap(name, fn) for name, fn in fns.items()}, samples


def per_round(samples: list, repeats: int, rounds: int) -> list[list[float]]:
    """Split the samples of one function into rounds as ``timeit`` made them (dropping the
    warm-up call that starts each round)."""
    out, i = [], 0
    for r in range(rounds):
        n = repeats // rounds + (r < repeats % rounds)
        out.append(samples[i + 1 : i + 1 + n])
        i += 1 + n
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--rounds", type=int, default=0,
                    help="rounds that take turns (default: one per repeat, the finest interleaving)")
    ap.add_argument("--no-script", action="store_true",
                    help="skip the TorchScript + folded batch-norm MitoNet variant")
    ap.add_argument("--out", default=str(HERE / "results" / "bench_mitonet_speed.json"))
    args = ap.parse_args(argv)

    from nbapp.engine import Engine
    from nbapp.inference import SliceSegmenter
    from nbapp.models import load_model
    from nbapp.models.loader import check_outputs
    from nbapp.params import SliceParams

    image, source = test_image()
    x = torch.randn(1, 1, 512, 512)

    net = build_mitonet_arch()
    mito_params = sum(p.numel() for p in net.parameters())
    print(f"MitoNet_v1-architecture network (random weights): {mito_params:,} parameters")
    with torch.inference_mode():
        for rs, ii in ((2, False), (2, True)):
            out = net(x, render_steps=rs, interpolate_ins=ii)
            check_outputs(out, tuple(x.shape), rs, ii)  # nbapp's model contract
            assert all(torch.isfinite(v).all() for v in out.values())
        mito_out_shapes = {k: list(v.shape) for k, v in net(x, 2, False).items()}
    fns = {}

    def mitonet_eager():
        with torch.inference_mode():
            net(x, render_steps=2, interpolate_ins=False)

    fns["MitoNet_v1-arch forward (eager)"] = mitonet_eager
    if not args.no_script:
        scripted = script_and_fold(net)
        with torch.inference_mode():
            for _ in range(2):  # the profiling executor optimises the graph on early calls
                scripted(x, 2, False)
            ref, got = net(x, 2, False), scripted(x, 2, False)
        # same network: folding only rounds differently (the re-rendered points may differ)
        assert torch.allclose(ref["ctr_hmp"], got["ctr_hmp"], rtol=1e-3, atol=1e-3 * ref["ctr_hmp"].abs().max())

        def mitonet_scripted():
            with torch.inference_mode():
                scripted(x, 2, False)

        fns["MitoNet_v1-arch forward (TorchScript, BN folded)"] = mitonet_scripted

    model = load_model("default", device="cpu")
    seg = SliceSegmenter(model)
    engine = Engine(model)
    params = SliceParams()
    counter = itertools.count(1)
    labels: list[np.ndarray] = []  # instances are counted after the timing

    def nbapp_full():  # a new image each call (cache miss): network + post-processing
        labels.append(seg(image ^ np.uint8(next(counter) % 256), params))

    fns["nbapp default: whole 2D inference (new image)"] = nbapp_full
    fns["nbapp default: network alone (Engine.infer)"] = lambda: engine.infer(image[None])

    misses0 = seg.misses
    t0 = time.perf_counter()
    rounds = args.rounds or args.repeats
    wrapped, samples = recorded(fns)
    rows = timeit(wrapped, args.repeats, rounds)
    wall = time.perf_counter() - t0
    by_round = {k: per_round(v, args.repeats, rounds) for k, v in samples.items()}
    for k, v in rows.items():
        v["min_ms"] = 1000 * min(t for r in by_round[k] for t in r)
    assert seg.hits == 0 and seg.misses - misses0 == len(labels), "nbapp cache was hit"
    n_inst = [int(np.count_nonzero(np.unique(lab))) for lab in labels]
    base_inst = int(np.count_nonzero(np.unique(seg(image, params))))

    eager = rows["MitoNet_v1-arch forward (eager)"]["median_ms"]
    full = rows["nbapp default: whole 2D inference (new image)"]["median_ms"]
    netonly = rows["nbapp default: network alone (Engine.infer)"]["median_ms"]
    ratios = {"MitoNet forward (eager) / nbapp whole inference": eager / full,
              "MitoNet forward (eager) / nbapp network alone": eager / netonly}
    key_s = "MitoNet_v1-arch forward (TorchScript, BN folded)"
    if key_s in rows:
        ratios["MitoNet forward (TorchScript, BN folded) / nbapp whole inference"] = rows[key_s]["median_ms"] / full
    fastest = min(v["median_ms"] for k, v in rows.items() if k.startswith("MitoNet"))
    ratios["fastest MitoNet forward / nbapp whole inference"] = fastest / full
    best = min((k for k in rows if k.startswith("MitoNet")), key=lambda k: rows[k]["median_ms"])
    nb = "nbapp default: whole 2D inference (new image)"
    paired = [float(np.median(a) / np.median(b)) for a, b in zip(by_round[best], by_round[nb])
              if a and b]
    ratios["fastest MitoNet / nbapp whole, median of per-round ratios"] = float(np.median(paired))
    ratios["fastest MitoNet / nbapp whole, best times (min / min)"] = rows[best]["min_ms"] / rows[nb]["min_ms"]

    info = machine()
    info.update(slice="512x512", batch=1, image=source, repeats=args.repeats, rounds=rounds,
                timing_wall_s=wall, load_average=os.getloadavg())
    result = {
        "machine": info,
        "mitonet_v1_arch": {"parameters": mito_params, "weights": "random (speed only)",
                            "call": "forward(x, render_steps=2, interpolate_ins=False)",
                            "output_shapes": mito_out_shapes, "settings": MITONET_V1},
        "nbapp": {"model": model.config.name, "parameters": model.parameters,
                  "call": "SliceSegmenter(load_model('default'))(image ^ k, SliceParams())",
                  "instances_base_image": base_inst,
                  "instances_timed_images": {"min": min(n_inst), "median": float(np.median(n_inst)),
                                             "max": max(n_inst)}},
        "rows": rows,
        "ratios": ratios,
        "claim_10x": ratios["fastest MitoNet forward / nbapp whole inference"] >= 10,
    }
    print(f"image: {source}; machine: {info['platform']}, {info['cpus']} CPUs, torch "
          f"{info['torch']} ({info['torch_threads']} threads)")
    print(f"parameters: MitoNet_v1-arch {mito_params:,}; nbapp {model.config.name} "
          f"{model.parameters:,}; nbapp instances found: base image {base_inst}, timed images "
          f"{min(n_inst)}-{max(n_inst)}")
    print(f"{'measurement (512x512, batch 1)':<52}{'median ms':>11}{'IQR ms':>9}{'min ms':>9}{'n':>4}")
    for k, v in rows.items():
        print(f"{k:<52}{v['median_ms']:>11.1f}{v['iqr_ms']:>9.1f}{v['min_ms']:>9.1f}{v['n']:>4}")
    for k, v in ratios.items():
        print(f"{k:<66}{v:>7.1f}x")
    print(f"claim (>= 10x, medians, against the fastest MitoNet variant): "
          f"{'met' if result['claim_10x'] else 'NOT met'}; load average {info['load_average']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
