"""Synthetic EM-like training patches with randomised appearance (domain randomisation).

Lucchi++ shows one tissue, one staining and one pixel size. Electron micrographs from other
labs differ in all three: mitochondria 10-40 px across instead of 100, darker (osmium) or
barely darker than the cytoplasm, cristae dark or bright; cells lie in bright or dark empty
resin, next to nuclei, lipid droplets and dense granules. A model that only saw Lucchi++
learns "darker than its surroundings" and paints whole cells and resin edges as
mitochondria. :func:`synthetic_patch` draws 2D patches where every such property is random
and only what makes a mitochondrion one stays fixed: a closed, compact or elongated shape
bounded by a dark (double) membrane with an inner texture (cristae). Distractors (cell
edges, resin, nuclei, droplets, granules, vesicles, membranes) are never labelled.

Pure numpy/scipy; procedural shapes only (no data from anywhere else).

>>> import numpy as np
>>> img, lab = synthetic_patch(np.random.default_rng(0), 64)
>>> img.shape, img.dtype, lab.dtype, bool(0.0 <= img.min() and img.max() <= 1.0)
((64, 64), dtype('float32'), dtype('int32'), True)
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

__all__ = ["synthetic_patch"]


def _noise(rng: np.random.Generator, shape: tuple, sigma: float) -> np.ndarray:
    """Smooth Gaussian noise with unit standard deviation and correlation length ``sigma``."""
    n = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return n / (n.std() + 1e-6)


def _lines(field: np.ndarray, width: float) -> np.ndarray:
    """Soft lines (peak 1) along the zero level set of ``field``, about ``width`` px wide."""
    gy, gx = np.gradient(field)
    dist = np.abs(field) / (np.hypot(gy, gx) + 1e-6)
    return np.exp(-(dist / width) ** 2)


def _window(size: int, cy: float, cx: float, reach: float):
    """Slices of the square of half-side ``reach`` around (cy, cx) inside the patch and the
    (y, x) pixel coordinates there (None where the square misses the patch)."""
    y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 1, size)
    x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 1, size)
    if y0 >= y1 or x0 >= x1:
        return None
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    return (slice(y0, y1), slice(x0, x1)), yy, xx


def _shape(rng: np.random.Generator, size: int, radius: float) -> tuple[np.ndarray, float]:
    """Mask of one mitochondrion-like shape (an ellipse or a bent tube of about ``radius``
    half-width) at a random place, and the angle of its long axis."""
    cy, cx = rng.uniform(-0.1, 1.1, 2) * size
    theta = rng.uniform(0, np.pi)
    u = np.array([np.sin(theta), np.cos(theta)])  # long axis (y, x)
    length = radius * float(np.exp(rng.uniform(0.0, np.log(5.0))))
    bend = rng.uniform(-0.8, 0.8) if rng.random() < 0.5 else None
    reach = length * (1.0 + abs(bend or 0.0)) + radius * 1.2 + 2
    mask = np.zeros((size, size), bool)
    win = _window(size, cy, cx, reach)
    if win is None:
        return mask, theta
    box, yy, xx = win
    if bend is None:  # ellipse
        along = (yy - cy) * u[0] + (xx - cx) * u[1]
        across = -(yy - cy) * u[1] + (xx - cx) * u[0]
        mask[box] = (along / length) ** 2 + (across / radius) ** 2 <= 1.0
        return mask, theta
    # bent tube: points within a (slowly varying) radius of a quadratic Bezier curve
    centre = np.array([cy, cx])
    p1 = centre + np.array([-u[1], u[0]]) * bend * length
    t = np.linspace(0, 1, 16)[:, None]
    p0, p2 = centre - u * length, centre + u * length
    curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
    r = radius * (1 + 0.15 * np.sin(rng.uniform(0, 6) + 5 * t[:, 0]))
    d2 = (yy[None] - curve[:, 0, None, None]) ** 2 + (xx[None] - curve[:, 1, None, None]) ** 2
    mask[box] = (d2 <= (r * r)[:, None, None]).any(0)
    return mask, theta


def _hard_negatives(rng: np.random.Generator, img: np.ndarray, free: np.ndarray) -> None:
    """Draw (in place, where ``free``) 1-4 unlabelled look-alikes that real models mistake for
    mitochondria: synaptic-vesicle clusters, multilamellar bodies (concentric membranes),
    dense bodies / lysosomes (dark, mottled, no cristae) and out-of-focus dark smudges."""
    size = img.shape[0]
    for _ in range(int(rng.integers(1, 5))):
        kind = ("vesicles", "lamellae", "dense", "smudge")[int(rng.integers(4))]
        cy, cx = rng.uniform(0, size, 2)
        radius = float(np.exp(rng.uniform(np.log(6.0), np.log(45.0))))
        win = _window(size, cy, cx, radius * 1.6 + 4)
        if win is None:
            continue
        box, yy, xx = win
        dy, dx = yy - cy, xx - cx
        angle = rng.uniform(0, np.pi)
        stretch = rng.uniform(1.0, 1.8)  # elongation along ``angle``
        along = dy * np.sin(angle) + dx * np.cos(angle)
        across = -dy * np.cos(angle) + dx * np.sin(angle)
        r = np.hypot(along / stretch, across)  # elliptical radius
        if kind == "vesicles":  # a cluster of small dark rings, densely packed
            radius = max(radius, 15.0)
            change = np.zeros(r.shape, np.float32)
            ring_r = rng.uniform(1.5, 4.5)
            depth = rng.uniform(0.1, 0.35)
            n = int(min(300, (radius / ring_r) ** 2 * rng.uniform(0.5, 0.9)))
            for vy, vx in zip(*(rng.uniform(-1, 1, (2, n)) * radius)):
                d = np.hypot(dy - vy, dx - vx)
                ring = depth * np.exp(-((d - ring_r * rng.uniform(0.8, 1.2)) / 0.7) ** 2)
                change = np.maximum(change, ring * (np.hypot(vy, vx) <= radius))
            change = -change
        elif kind == "lamellae":  # 2-6 concentric dark membranes around a darker core
            spacing = rng.uniform(2.0, 5.0)
            wobble = 1 + 0.08 * np.sin(rng.uniform(0, 6) + 3 * np.arctan2(dy, dx))
            rr = r * wobble
            inner = max(radius - int(rng.integers(2, 7)) * spacing, 0.0)
            rings = np.cos(np.pi * (rr - radius) / spacing) ** 8 * (rr >= inner) * (rr <= radius)
            core = rr < inner
            change = -rng.uniform(0.15, 0.4) * rings
            core_level = rng.uniform(0.0, 0.25) + rng.uniform(0, 0.1) * _noise(rng, r.shape, 1.5)
            change -= np.clip(core_level, 0, None) * core
        elif kind == "dense":  # dark blob with a granular, mottled inside and a thin membrane
            inside = np.clip(radius * 0.7 + 0.5 - r, 0, 1)
            mottle = _noise(rng, r.shape, rng.uniform(0.8, 2.5))
            level = rng.uniform(0.2, 0.55)
            edge = np.exp(-((r - radius * 0.7) / 0.8) ** 2) * rng.uniform(0.0, 0.2)
            dark = np.clip(level + rng.uniform(0.04, 0.15) * mottle, 0.05, None)
            change = -dark * inside - edge
        else:  # smudge: a smooth dark patch without any edge
            change = -rng.uniform(0.15, 0.45) * np.exp(-(r / (radius * 0.7)) ** 2)
        img[box] += change * free[box]


def synthetic_patch(rng: np.random.Generator, size: int = 256,
                    hard_negatives: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """One random EM-like patch and its mitochondria instance labels.

    ``hard_negatives`` is the probability that the patch also gets unlabelled look-alikes
    (vesicle clusters, multilamellar bodies, dense bodies, dark smudges); at 0 (the default)
    the patches, and the random numbers drawn for them, are those of nbapp 0.4.

    Returns
    -------
    image : (size, size) float32 in [0, 1]
    labels : (size, size) int32, 0 background, 1..K mitochondria
    """
    shape = (size, size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    base = rng.uniform(0.35, 0.8)
    img = base + rng.uniform(0.01, 0.06) * _noise(rng, shape, rng.uniform(4, 20))
    img += rng.uniform(0.0, 0.04) * _noise(rng, shape, rng.uniform(0.6, 1.5))  # ribosomes

    # cell edge: the rest of the patch is empty resin (bright, or dark) behind a membrane
    outside = np.zeros(shape, bool)
    if rng.random() < 0.35:
        field = _noise(rng, shape, rng.uniform(25, 60)) + rng.uniform(-1.0, 0.3)
        outside = field > 0
        img[outside] = (rng.uniform(0.8, 1.0) if rng.random() < 0.7 else rng.uniform(0.0, 0.2))
        img[outside] += 0.01 * _noise(rng, shape, 2.0)[outside]
        img -= rng.uniform(0.1, 0.4) * _lines(field, rng.uniform(0.8, 2.0))
    # a nucleus: a large region with its own level, chromatin clumps and an envelope
    if rng.random() < 0.25:
        cy, cx = rng.uniform(0, size, 2)
        r = size * rng.uniform(0.3, 0.8)
        field = np.hypot(yy - cy, xx - cx) / r - 1 + 0.1 * _noise(rng, shape, 15)
        nuc = (field < 0) & ~outside
        img[nuc] += rng.uniform(-0.25, 0.1) + rng.uniform(0, 0.15) * _noise(rng, shape, 3)[nuc]
        img -= rng.uniform(0.1, 0.3) * _lines(field, 1.5) * ~outside

    # mitochondria: sizes like other labs' pixel sizes; gaps of cytoplasm between them
    labels = np.zeros(shape, np.int32)
    radius = float(np.exp(rng.uniform(np.log(4.0), np.log(40.0))))
    taken, near = outside.copy(), outside.copy()
    for _ in range(int(rng.integers(1, 40))):
        if (labels > 0).mean() > rng.uniform(0.1, 0.35):
            break
        mask, theta = _shape(rng, size, radius * rng.uniform(0.7, 1.3))
        if not mask.any() or (mask & near).any():
            continue
        labels[mask] = labels.max() + 1
        taken |= mask
        near = ndi.binary_dilation(taken, iterations=2)
    fg = labels > 0
    if fg.any():
        depth = ndi.distance_transform_edt(fg)  # px from the outer membrane inwards
        shift = rng.uniform(-0.5, 0.0)  # matrix against cytoplasm: darker or about the same
        period = rng.uniform(3.0, 9.0)
        # one cristae direction per patch: across the long axis of the last shape drawn
        phase = theta + rng.uniform(-0.5, 0.5)
        wobble = _noise(rng, shape, period) * rng.uniform(0, 1.5)
        stripes = np.cos(2 * np.pi * (yy * np.sin(phase) + xx * np.cos(phase)) / period + wobble)
        cristae = rng.uniform(-0.2, 0.2) * np.clip(stripes, 0, None) ** 2
        membrane = rng.uniform(0.12, 0.4) * np.exp(-((depth - 1.0) / rng.uniform(0.8, 1.6)) ** 2)
        inner = fg & (depth > 2.0)
        value = img + shift - membrane + cristae * inner
        value += rng.uniform(0, 0.05) * _noise(rng, shape, 1.0)
        feather = ndi.gaussian_filter(fg.astype(np.float32), 0.6)
        img = img * (1 - feather) + value * feather

    free = ~ndi.binary_dilation(taken, iterations=3)  # also keeps distractors off the resin
    # membranes (ER, cell borders) as dark curves, around the mitochondria
    for _ in range(int(rng.integers(0, 4))):
        img -= rng.uniform(0.05, 0.35) * _lines(_noise(rng, shape, rng.uniform(8, 40)),
                                                rng.uniform(0.6, 2.0)) * free
    # distractors, never labelled: dense granules and droplets (smooth discs), vesicles (rings)
    for kind in ("granule", "droplet", "vesicle"):
        for _ in range(int(rng.integers(0, {"granule": 12, "droplet": 3, "vesicle": 30}[kind]))):
            cy, cx = rng.uniform(0, size, 2)
            if not free[int(cy), int(cx)]:
                continue
            d = np.hypot(yy - cy, xx - cx)
            if kind == "granule":
                change = -rng.uniform(0.2, 0.6) * (d <= rng.uniform(1.5, 6))
            elif kind == "droplet":
                change = rng.uniform(-0.5, 0.1) * np.clip(rng.uniform(5, 30) + 0.5 - d, 0, 1)
            else:
                change = -rng.uniform(0.1, 0.3) * np.exp(-((d - rng.uniform(2, 8)) / 0.8) ** 2)
            img += change * free
    if hard_negatives and rng.random() < hard_negatives:
        _hard_negatives(rng, img, free)
    img = ndi.gaussian_filter(img, rng.uniform(0.3, 1.2))
    img += rng.normal(0, rng.uniform(0.005, 0.05), shape)
    return np.clip(img, 0, 1).astype(np.float32), labels
