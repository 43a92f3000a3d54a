"""Image-quality metrics between clean and triggered image batches.

Both functions take two tensors shaped (N, C, H, W) with values in [0, 1],
compute in float64 on the inputs' device, and return a Python float: the
per-image score averaged over the batch.
"""
import math

import torch
import torch.nn.functional as F


def _check(clean, triggered, min_size=1):
    if clean.dim() != 4 or triggered.dim() != 4:
        raise ValueError(f"expected 4-D tensors (N, C, H, W), got shapes "
                         f"{tuple(clean.shape)} and {tuple(triggered.shape)}")
    if clean.shape != triggered.shape:
        raise ValueError(f"shape mismatch: clean {tuple(clean.shape)} vs "
                         f"triggered {tuple(triggered.shape)}")
    if clean.shape[-2] < min_size or clean.shape[-1] < min_size:
        raise ValueError(f"images must be at least {min_size}x{min_size}, "
                         f"got {clean.shape[-2]}x{clean.shape[-1]}")
    return clean.double(), triggered.to(device=clean.device, dtype=torch.float64)


def psnr(clean, triggered):
    """Mean PSNR in dB with peak 1, over the image pairs that differ.

    For each image i: MSE_i = mean over (C, H, W) of (x - y)^2 and
    PSNR_i = 10 * log10(1 / MSE_i) = -10 * log10(MSE_i); the result is the
    mean of PSNR_i over the pairs with MSE_i > 0. A pair that is identical (a
    BadNets patch on an image whose corner is already white) has PSNR_i = +inf
    and is left out, or every finite mean would be +inf; +inf when all are identical.
    """
    values = psnr_per_image(clean, triggered)
    changed = values[values.isfinite()]
    return float(changed.mean()) if len(changed) else math.inf


def psnr_per_image(clean, triggered):
    """PSNR_i = -10 log10(MSE_i) of each pair (peak 1), +inf where a pair is identical: a (N,) tensor."""
    x, y = _check(clean, triggered)
    return -10.0 * torch.log10(((x - y) ** 2).flatten(1).mean(dim=1))


def _gaussian_window(size=11, sigma=1.5, **kw):
    g = torch.exp(-((torch.arange(size, **kw) - (size - 1) / 2) ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return torch.outer(g, g)  # sums to 1


def ssim(clean, triggered, win_size=11, sigma=1.5, K1=0.01, K2=0.03):
    """Mean SSIM (Wang et al. 2004) with data range L = 1.

    With w the normalised 11x11 Gaussian window (sigma 1.5), applied per
    channel with no padding ('valid' positions only):
        mu_x = w * x,  sigma_x^2 = w * x^2 - mu_x^2,  sigma_xy = w * (x y) - mu_x mu_y
        SSIM = ((2 mu_x mu_y + C1)(2 sigma_xy + C2))
               / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2)),
        C1 = (K1 L)^2, C2 = (K2 L)^2.
    The SSIM map is averaged per image and channel, then over channels, then
    over the batch. Matches skimage's structural_similarity with
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.
    """
    x, y = _check(clean, triggered, min_size=win_size)
    C = x.shape[1]
    w = _gaussian_window(win_size, sigma, dtype=torch.float64, device=x.device)
    w = w.expand(C, 1, win_size, win_size)
    filt = lambda t: F.conv2d(t, w, groups=C)  # noqa: E731
    mu_x, mu_y = filt(x), filt(y)
    var_x = filt(x * x) - mu_x ** 2
    var_y = filt(y * y) - mu_y ** 2
    cov = filt(x * y) - mu_x * mu_y
    C1, C2 = K1 ** 2, K2 ** 2
    smap = ((2 * mu_x * mu_y + C1) * (2 * cov + C2)) / (
        (mu_x ** 2 + mu_y ** 2 + C1) * (var_x + var_y + C2))
    return float(smap.mean(dim=(2, 3)).mean(dim=1).mean())
