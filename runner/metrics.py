"""Image metrics in pixel space (numpy only, no model weights) for the step and layer study.

Images are float arrays ``(H, W, 3)`` with values in [0, 1].
"""

from __future__ import annotations

import numpy as np

# Wang et al. 2004, "Image quality assessment: from error visibility to structural similarity", eq. 13:
# an 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, dynamic range L = 1.
SSIM_SIGMA, SSIM_RADIUS, SSIM_K1, SSIM_K2 = 1.5, 5, 0.01, 0.03
HIST_BINS = 32


def _gaussian_filter(x: np.ndarray, sigma: float = SSIM_SIGMA, radius: int = SSIM_RADIUS) -> np.ndarray:
    """Separable Gaussian blur of the first two axes, edges mirrored (``reflect``, as scipy's default)."""
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (t / sigma) ** 2)
    kernel /= kernel.sum()
    for axis in (0, 1):
        pad = [(0, 0)] * x.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(x, pad, mode="symmetric")
        windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * radius + 1, axis=axis)
        x = windows @ kernel
    return x


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean structural similarity of two images (per channel, then averaged); 1 = identical.

    The mean of the SSIM map over the pixels whose window lies inside the image, as
    ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1)`` computes it.
    """
    a, b = _as_float(a), _as_float(b)
    if a.shape != b.shape:
        raise ValueError(f"ssim: images of different sizes {a.shape[:2]} and {b.shape[:2]}")
    c1, c2 = (SSIM_K1 * 1.0) ** 2, (SSIM_K2 * 1.0) ** 2
    mu_a, mu_b = _gaussian_filter(a), _gaussian_filter(b)
    var_a = _gaussian_filter(a * a) - mu_a ** 2
    var_b = _gaussian_filter(b * b) - mu_b ** 2
    cov = _gaussian_filter(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    r = SSIM_RADIUS
    if s.shape[0] > 2 * r and s.shape[1] > 2 * r:
        s = s[r:-r, r:-r]  # the border, where the window leaves the image, is left out
    return float(s.mean())


def histogram_distance(a: np.ndarray, b: np.ndarray, bins: int = HIST_BINS) -> float:
    """Hellinger distance of the two images' colour histograms (per RGB channel, averaged).

    0 = the same colour distribution, 1 = no colour in common; independent of where the colours are.
    """
    a, b = _as_float(a), _as_float(b)
    out = []
    for c in range(a.shape[2]):
        p = np.histogram(a[..., c], bins=bins, range=(0.0, 1.0))[0].astype(np.float64)
        q = np.histogram(b[..., c], bins=bins, range=(0.0, 1.0))[0].astype(np.float64)
        p, q = p / p.sum(), q / q.sum()
        out.append(np.sqrt(max(0.0, 1.0 - float(np.sqrt(p * q).sum()))))
    return float(np.mean(out))


def seam_error(image: np.ndarray, mask: np.ndarray, threshold: float = 0.5) -> tuple[float, float]:
    """How visible the border between the kept and the generated region is.

    ``mask``: ``(H, W)``, 1 = generated (ComfyUI's polarity), thresholded at ``threshold``.
    Returns ``(seam, ratio)``: ``seam`` is the mean absolute RGB difference between neighbouring
    pixels (right and down neighbours) of which one is kept and the other generated; ``ratio`` is
    ``seam`` over the same difference between neighbours on the same side (the image's own
    texture), so 1 means the border is as smooth as the rest and larger means a visible seam.
    NaN when the mask has no border.
    """
    image = _as_float(image)
    m = np.asarray(mask, dtype=np.float64) >= threshold
    if m.shape != image.shape[:2]:
        raise ValueError(f"seam_error: mask {m.shape} and image {image.shape[:2]} differ in size")
    across, within = [], []
    for axis in (0, 1):
        diff = np.abs(np.diff(image, axis=axis)).mean(axis=2)
        crossing = np.diff(m.astype(np.int8), axis=axis) != 0
        across.append(diff[crossing])
        within.append(diff[~crossing])
    across, within = np.concatenate(across), np.concatenate(within)
    if across.size == 0:
        return float("nan"), float("nan")
    seam = float(across.mean())
    texture = float(within.mean()) if within.size else float("nan")
    return seam, (seam / texture if texture > 0 else float("nan"))


def load_rgb(path) -> np.ndarray:
    """An image file as ``(H, W, 3)`` floats in [0, 1]."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0


def load_mask(path, size: tuple[int, int] | None = None) -> np.ndarray:
    """A mask saved as an image (white = 1) as ``(H, W)`` floats, resized to ``size`` (W, H) when given."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("L")
        if size is not None and im.size != tuple(size):
            im = im.resize(tuple(size), Image.NEAREST)
        return np.asarray(im, dtype=np.float64) / 255.0


def _as_float(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 2:
        x = x[..., None]
    return x
