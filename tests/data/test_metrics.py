"""Tests for helper.data.metrics against values worked out by hand / plain numpy."""
import math

import numpy as np
import pytest
import torch

from helper.data.metrics import psnr, ssim

C1, C2 = 0.01 ** 2, 0.03 ** 2


def _window_np(size=11, sigma=1.5):
    """11x11 Gaussian window built explicitly, element by element."""
    c = (size - 1) / 2
    w = np.empty((size, size))
    for i in range(size):
        for j in range(size):
            w[i, j] = math.exp(-((i - c) ** 2 + (j - c) ** 2) / (2 * sigma ** 2))
    return w / w.sum()


def _ssim_ref_np(x, y):
    """Reference SSIM for one 2-D channel: loops over every valid window position."""
    w = _window_np()
    k = w.shape[0]
    H, W = x.shape
    vals = []
    for r in range(H - k + 1):
        for c in range(W - k + 1):
            px, py = x[r:r + k, c:c + k], y[r:r + k, c:c + k]
            mx, my = (w * px).sum(), (w * py).sum()
            vx = (w * (px - mx) ** 2).sum()
            vy = (w * (py - my) ** 2).sum()
            cxy = (w * (px - mx) * (py - my)).sum()
            vals.append((2 * mx * my + C1) * (2 * cxy + C2)
                        / ((mx ** 2 + my ** 2 + C1) * (vx + vy + C2)))
    return float(np.mean(vals))


def _checkerboard(h, w):
    i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.where((i + j) % 2 == 0, 1.0, -1.0)


def test_identical_images():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert psnr(x, x.clone()) == math.inf
    assert abs(ssim(x, x.clone()) - 1.0) < 1e-12


@pytest.mark.parametrize("a,d", [(0.5, 0.1), (0.2, 0.05), (0.9, -0.3)])
def test_constant_shift(a, d):
    x = torch.full((1, 3, 16, 16), a, dtype=torch.float64)
    y = torch.full((1, 3, 16, 16), a + d, dtype=torch.float64)
    b = a + d
    expected_psnr = -10 * math.log10((b - a) ** 2)  # ~ -10 log10(d^2)
    assert psnr(x, y) == pytest.approx(expected_psnr, abs=1e-9)
    assert psnr(x, y) == pytest.approx(-10 * math.log10(d ** 2), abs=1e-6)
    # both images constant: variances and covariance are zero
    expected_ssim = (2 * a * b + C1) / (a ** 2 + b ** 2 + C1)
    assert ssim(x, y) == pytest.approx(expected_ssim, abs=1e-9)


def test_psnr_20db_example():
    x = torch.full((1, 3, 8, 8), 0.5)
    assert psnr(x, x + 0.1) == pytest.approx(20.0, abs=1e-4)  # float32 input


def test_checkerboard_noise():
    a, e, H = np.array([0.3, 0.5, 0.7]), 0.05, 16
    s = _checkerboard(H, H)
    x_np = np.broadcast_to(a[:, None, None], (3, H, H)).copy()
    y_np = x_np + e * s
    x = torch.from_numpy(x_np)[None]
    y = torch.from_numpy(y_np)[None]
    # MSE is exactly e^2 -> PSNR = -10 log10(e^2)
    assert psnr(x, y) == pytest.approx(-10 * math.log10(e ** 2), abs=1e-9)
    expected = np.mean([_ssim_ref_np(x_np[c], y_np[c]) for c in range(3)])
    assert expected < 1.0
    assert ssim(x, y) == pytest.approx(expected, abs=1e-6)


def test_ssim_random_vs_numpy_reference():
    g = np.random.default_rng(1)
    x_np, y_np = g.random((2, 2, 14, 13)), g.random((2, 2, 14, 13))
    expected = np.mean([[_ssim_ref_np(x_np[n, c], y_np[n, c]) for c in range(2)]
                        for n in range(2)])
    assert ssim(torch.from_numpy(x_np), torch.from_numpy(y_np)) == pytest.approx(expected, abs=1e-6)


def test_batch_mean():
    x = torch.full((2, 3, 12, 12), 0.5, dtype=torch.float64)
    y = x.clone()
    y[0] += 0.1   # 20 dB
    y[1] += 0.01  # 40 dB
    assert psnr(x, y) == pytest.approx(30.0, abs=1e-6)
    s0 = (2 * 0.5 * 0.6 + C1) / (0.5 ** 2 + 0.6 ** 2 + C1)
    s1 = (2 * 0.5 * 0.51 + C1) / (0.5 ** 2 + 0.51 ** 2 + C1)
    assert ssim(x, y) == pytest.approx((s0 + s1) / 2, abs=1e-9)


def test_bad_input():
    x = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match="shape mismatch"):
        psnr(x, torch.rand(1, 3, 16, 15))
    with pytest.raises(ValueError, match="shape mismatch"):
        ssim(x, torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match="4-D"):
        ssim(x[0], x[0])
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.rand(1, 3, 10, 16), torch.rand(1, 3, 10, 16))


def test_psnr_leaves_out_the_pairs_a_trigger_does_not_change():
    """A BadNets patch on an image whose corner is already white changes nothing there: that pair's PSNR is inf,
    and a mean with it would call every BadNets trigger invisible. The mean is over the pairs that differ."""
    x = torch.zeros(3, 3, 8, 8)
    y = x.clone()
    y[0] += 0.1                  # MSE 0.01: 20 dB
    y[1, :, :4] += 0.01          # MSE 0.5 * 1e-4: 43.0103 dB
    assert psnr(x, y) == pytest.approx((20.0 + 10 * math.log10(2e4)) / 2, abs=1e-4)  # image 2 identical: left out
    assert psnr(x, x.clone()) == math.inf


def test_a_badnets_trigger_on_white_corners_is_not_called_vanished():
    from helper.data.trigger import trigger_stats
    mask = torch.zeros(1, 32, 32)
    mask[:, 29:, 29:] = 1.0
    clean = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    clean[:2] = 255  # two all-white images: the patch changes nothing on them
    stats = trigger_stats(torch.ones(3, 32, 32), mask, clean, with_ssim=False)
    assert stats["psnr"] == pytest.approx(-10 * math.log10(9 / 1024), abs=1e-4) and not stats["vanished"]
