"""Datasets as uint8 tensors (N,3,32,32) with int64 labels, and per-batch augmentation on the device.

Sources, by name: ``cifar10`` and ``cifar100`` through torchvision (downloaded into ``--data_root``),
``synthetic`` (generated in-process, see ``synthetic_split``), or a path to an ``.npz`` file with
``x_train``/``y_train`` and ``x_test``/``y_test`` (N,32,32,3 uint8), or one split as ``x``/``y``.
Images never go through PIL: crop and flip are one gather per batch (``augment``).
"""
import math
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from helper.run.errors import UserError

CIFAR = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}


@dataclass
class Split:
    x: torch.Tensor  # uint8 (N, 3, 32, 32)
    y: torch.Tensor  # int64 (N,)

    def __len__(self):
        return len(self.y)

    def subset(self, index):
        return Split(self.x[index], self.y[index])

    def to(self, device):
        return Split(self.x.to(device), self.y.to(device))


def concat(a, b):
    return Split(torch.cat([a.x, b.x]), torch.cat([a.y, b.y]))


def _from_numpy(x, y, where):
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim != 4 or x.shape[1:] != (32, 32, 3) or x.dtype != np.uint8:
        raise UserError(f"{where}: images must be uint8 of shape (N,32,32,3), found {x.dtype} {x.shape}")
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"{where}: labels must be integers of shape ({len(x)},), found {y.dtype} {y.shape}")
    if len(y) and y.min() < 0:
        raise UserError(f"{where}: labels must be >= 0, found {int(y.min())}")
    return Split(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))), torch.from_numpy(y.astype(np.int64)))


# ---------------------------------------------------------------- torchvision CIFAR

def _cifar(name, root, train, download):
    import torchvision.datasets as tvd
    cls = getattr(tvd, CIFAR[name])
    archive = os.path.join(root, cls.filename)
    try:
        ds = cls(root, train=train, download=False)
    except RuntimeError:
        if not download:
            raise UserError(f"{name} is not in {root}/ and --no_download is set: put {cls.filename} "
                            f"({cls.url}) at {archive}") from None
        try:
            ds = cls(root, train=train, download=True)
        except Exception as e:  # offline, proxy, a corrupt archive
            raise UserError(f"{name} is not in {root}/ and could not be downloaded ({type(e).__name__}); "
                            f"put {cls.filename} ({cls.url}) at {archive} and run again") from None
    return _from_numpy(ds.data, np.asarray(ds.targets), f"{name} in {root}")


# ---------------------------------------------------------------- .npz files

def _npz(path):
    if not os.path.isfile(path):
        raise UserError(f"dataset file not found: {path}")
    try:
        d = np.load(path, allow_pickle=False)
    except Exception as e:
        raise UserError(f"cannot read {path} as .npz: {e}") from None
    keys = set(d.files)

    def arrays(*names):
        try:
            return [d[n] for n in names]
        except ValueError as e:  # object arrays need pickle, which is never allowed
            raise UserError(f"cannot read {path}: {e}") from None
    if {"x_train", "y_train", "x_test", "y_test"} <= keys:
        xtr, ytr, xte, yte = arrays("x_train", "y_train", "x_test", "y_test")
        return _from_numpy(xtr, ytr, f"{path} (train)"), _from_numpy(xte, yte, f"{path} (test)")
    if {"x", "y"} <= keys:
        one = _from_numpy(*arrays("x", "y"), path)
        return one, one
    raise UserError(f"{path} must hold x_train/y_train/x_test/y_test or x/y; it holds {sorted(keys)}")


# ---------------------------------------------------------------- synthetic data

def _render(prototypes, labels, gen):
    """Images of the given prototype classes with per-image shift, phase, contrast, background and noise.

    A prototype is a coarse 4x4 colour layout plus an oriented colour grating; each image shifts it by
    up to 4 pixels, draws the grating's phase, scales contrast and brightness, adds a random low-
    frequency background and pixel noise. Returns uint8 (N,3,32,32).
    """
    coarse, freq, theta, tint = prototypes
    n = len(labels)
    size = 32
    layout = F.interpolate(coarse[labels], size=(size + 8, size + 8), mode="bilinear", align_corners=False)
    dy, dx = torch.randint(0, 9, (2, n), generator=gen)
    ar = torch.arange(size)
    rows = (dy[:, None] + ar)[:, None, :, None]
    cols = (dx[:, None] + ar)[:, None, None, :]
    layout = layout[torch.arange(n)[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols]
    yy, xx = torch.meshgrid(ar.float(), ar.float(), indexing="ij")
    phase = torch.rand(n, generator=gen) * 2 * math.pi
    f, th = freq[labels][:, None, None], theta[labels][:, None, None]
    wave = torch.sin(2 * math.pi * f * (xx * torch.cos(th) + yy * torch.sin(th)) / size + phase[:, None, None])
    img = layout + 0.35 * wave[:, None] * tint[labels][:, :, None, None]
    background = F.interpolate(torch.rand(n, 3, 8, 8, generator=gen), size=(size, size), mode="bilinear", align_corners=False)
    contrast = 0.6 + 0.5 * torch.rand(n, 1, 1, 1, generator=gen)
    brightness = 0.2 * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5)
    img = contrast * (0.7 * img + 0.3 * background - 0.5) + 0.5 + brightness
    img = img + 0.04 * torch.randn(img.shape, generator=gen)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def _prototypes(n_classes, gen, freq_range):
    coarse = torch.rand(n_classes, 3, 4, 4, generator=gen)
    lo, hi = freq_range
    freq = lo + (hi - lo) * torch.rand(n_classes, generator=gen)
    theta = torch.rand(n_classes, generator=gen) * math.pi
    tint = torch.rand(n_classes, 3, generator=gen) * 2 - 1
    return coarse, freq, theta, tint


def synthetic_split(kind, n, split, seed=0, chunk=5000):
    """A seeded synthetic split, no files: ``kind='task'`` stands in for CIFAR-10, ``'ood'`` for CIFAR-100.

    ``task``: 10 classes, each a prototype (coarse colour layout + grating of frequency 1-4 cycles).
    ``ood``: 100 other prototypes with finer gratings (3-8 cycles), and every image a 60/40 mixture of
    two of them, so it shares the family of pictures but none of the task's classes.
    The prototypes depend on ``seed`` alone; ``split`` ('train' or 'test') draws other images of them.
    """
    if kind not in ("task", "ood"):
        raise ValueError(f"kind must be 'task' or 'ood', not {kind!r}")
    proto_gen = torch.Generator().manual_seed(seed * 1000 + (0 if kind == "task" else 1))
    n_classes = 10 if kind == "task" else 100
    prototypes = _prototypes(n_classes, proto_gen, (1.0, 4.0) if kind == "task" else (3.0, 8.0))
    gen = torch.Generator().manual_seed(seed * 1000 + 10 + (0 if split == "train" else 1) + (0 if kind == "task" else 2))
    xs, ys = [], []
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        labels = torch.randint(0, n_classes, (m,), generator=gen)
        if kind == "task":
            x = _render(prototypes, labels, gen)
        else:
            other = torch.randint(0, n_classes, (m,), generator=gen)
            x = (0.6 * _render(prototypes, labels, gen).float() + 0.4 * _render(prototypes, other, gen).float()).round().to(torch.uint8)
        xs.append(x)
        ys.append(labels)
    return Split(torch.cat(xs) if xs else torch.zeros(0, 3, 32, 32, dtype=torch.uint8),
                 torch.cat(ys) if ys else torch.zeros(0, dtype=torch.int64))


# ---------------------------------------------------------------- one entry point

def load_splits(name, data_root="data", role="task", download=True, synthetic_seed=0,
                synthetic_train=50000, synthetic_test=10000, flag="--dataset"):
    """(train, test) Splits of a dataset name or ``.npz`` path; ``role`` picks the synthetic generator.

    ``role='task'`` is the teacher's dataset (its test set is where Acc and ASR are measured);
    ``role='ood'`` is the defense data. For a single-split ``.npz`` both are the same object.
    """
    if name in CIFAR:
        return _cifar(name, data_root, True, download), _cifar(name, data_root, False, download)
    if name == "synthetic":
        return (synthetic_split(role, synthetic_train, "train", synthetic_seed),
                synthetic_split(role, synthetic_test, "test", synthetic_seed))
    if name.endswith(".npz"):
        return _npz(name)
    raise UserError(f"unknown {flag} {name!r}: use cifar10, cifar100, synthetic or a path to an .npz file")


def defense_pool(train, test, extend=False):
    """The images the defense draws from: the train split, or train + test with ``extend`` (60,000 for CIFAR-100)."""
    if not extend or train is test:
        return train
    return concat(train, test)


def seeded_subset(split, rate, seed, count=None):
    """Exactly ``round(rate * len(split))`` images (or ``count`` of them), drawn by a seeded permutation
    (``random_split`` style)."""
    if count is not None:
        if not 1 <= count <= len(split):
            raise UserError(f"--defense_size {count}: the defense pool has {len(split)} images")
        k = count
    elif not 0 < rate <= 1:
        raise UserError(f"--subset_rate must be in (0, 1], not {rate}")
    else:
        k = int(round(rate * len(split)))
    if k < 1:
        raise UserError(f"--subset_rate {rate} of {len(split)} images leaves no image")
    index = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:k]
    return split.subset(index)


# ---------------------------------------------------------------- per-batch work on the device

def augment(x, generator=None, pad=4, flip=True):
    """Random crop (zero padding ``pad``) and horizontal flip of a uint8 batch in one gather; returns [0,1] floats.

    The same as torchvision's ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip()`` per image,
    done for the whole batch on its device.
    """
    b, c, h, w = x.shape
    dev = x.device
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), device=dev, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b,), device=dev, generator=generator)
    rows = dy[:, None] + torch.arange(h, device=dev)
    cols = dx[:, None] + torch.arange(w, device=dev)
    if flip:
        flipped = torch.rand(b, device=dev, generator=generator) < 0.5
        cols = torch.where(flipped[:, None], cols.flip(1), cols)
    out = padded[torch.arange(b, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
                 rows[:, None, :, None], cols[:, None, None, :]]
    return out.float().div_(255)


def to_float(x):
    return x.float().div_(255)


def cutmix_box(size, lam, cx, cy):
    """CutMix's box (Yun et al. 2019, as ABD's ``rand_bbox``): side ``int(size * sqrt(1 - lam))`` centred at
    ``(cx, cy)``, clipped to the image: ``(x1, y1, x2, y2)`` with ``x1 = clip(cx - side // 2)``, ``x2 = clip(cx + side // 2)``."""
    side = int(size * (1.0 - lam) ** 0.5)
    clip = lambda v: min(max(v, 0), size)  # noqa: E731
    return clip(cx - side // 2), clip(cy - side // 2), clip(cx + side // 2), clip(cy + side // 2)


def cutmix(x, rng, beta=0.25, prob=1.0):
    """CutMix without labels (ABD's KD on out-of-distribution images): with probability ``prob``, one box per batch
    (``cutmix_box`` with ``lam ~ Beta(beta, beta)`` and a uniform centre) is filled, in every image, with the same
    box of another image of the batch (a random permutation). The teacher answers the mixed image, so no label is
    mixed. ``rng``: a ``numpy.random.Generator`` (its state is kept for ``--resume``); returns a new tensor."""
    if beta <= 0 or rng.random() >= prob:
        return x
    lam = rng.beta(beta, beta)
    x1, y1, x2, y2 = cutmix_box(x.shape[-1], lam, int(rng.integers(x.shape[-1])), int(rng.integers(x.shape[-2])))
    perm = torch.as_tensor(rng.permutation(len(x)), device=x.device)
    out = x.clone()
    out[:, :, x1:x2, y1:y2] = x[perm, :, x1:x2, y1:y2]
    return out


def batches(n, batch_size, generator=None, device="cpu", shuffle=True):
    """Index tensors of consecutive batches over a (seeded) permutation of ``range(n)``; the last may be short."""
    order = torch.randperm(n, device=device, generator=generator) if shuffle else torch.arange(n, device=device)
    return order.split(batch_size)


def augmented_batches(images, batch_size, generator, memory_format, progress=True, desc="batches"):
    """One epoch over uint8 ``images`` on their device: ``(cropped/flipped float batch, its indices)`` per
    batch of a seeded permutation (the last batch may be short), with an optional tqdm bar."""
    for idx in tqdm(batches(len(images), batch_size, generator, images.device), leave=False, desc=desc,
                    disable=not progress, file=sys.stdout):
        yield augment(images[idx], generator).contiguous(memory_format=memory_format), idx
