"""The ASD training step written the way the public ASD code writes it: the yardstick of ``bench.py``.

Nothing here is used for training. It exists so that the speed of ``helper.jobs.distill`` can be measured
against the loop the paper's code runs, and so that a test can check both compute the same loss:

- a torchvision ``DataLoader`` (2 workers) over a ``Dataset`` that turns every uint8 image into a PIL
  image and applies ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip()`` and ``ToTensor()`` one
  image at a time;
- fp32, default (contiguous) memory format, no autocast;
- forward hooks that store every residual block's ``conv1`` output **and** ``conv2`` input, on the
  teacher and the student, although only the ``conv1`` outputs are used (SPEC section 9);
- ASL through boolean-mask indexing (``t[t != 0] / t[t != 0].abs()``), one host sync per mask;
- KD through ``F.kl_div(..., reduction='mean')``, ``KLDivLoss()``'s default;
- ``.item()`` on the losses after every step.

One defect of the public code is *not* copied: its ASL used sample 0 of each batch only. Here ASL is the
mean over the whole batch, the quantity ``helper.train.losses.attention_shifting_loss`` computes, so that the
two steps do the same work and their losses can be compared (``tests/test_speed_equivalence.py``).
"""
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset


class PILImages(Dataset):
    """uint8 (N,3,32,32) images served one at a time through PIL and torchvision transforms, as CIFAR is."""

    def __init__(self, images, train=True):
        from torchvision import transforms
        self.data = np.ascontiguousarray(images.cpu().permute(0, 2, 3, 1).numpy())  # (N,32,32,3), like CIFAR10.data
        steps = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if train else []
        self.transform = transforms.Compose(steps + [transforms.ToTensor()])

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.data[i])), 0  # the defense data's labels are never used


def reference_loader(images, batch_size=128, num_workers=2, seed=0):
    """The public code's loader: shuffled, per-image PIL transforms in ``num_workers`` worker processes."""
    return DataLoader(PILImages(images), batch_size=batch_size, shuffle=True, num_workers=num_workers,
                      generator=torch.Generator().manual_seed(seed))


def reference_asl(teacher_feat, student_feat, eps=0.1):
    """ASL (SPEC section 4) by boolean-mask indexing, as the public code computes it, over the whole batch."""
    t = teacher_feat.detach().float()
    s = student_feat.float()
    t_prime = torch.zeros_like(t)
    nz_t = t != 0
    t_prime[nz_t] = t[nz_t] / t[nz_t].abs()
    t_prime[~nz_t] = (torch.sign(s.detach()[~nz_t]) - 1) * eps
    nz_s = s.detach() != 0
    s_prime = s.clone()
    s_prime[nz_s] = s[nz_s] / s[nz_s].detach().abs()
    return ((1 + t_prime * s_prime) ** 2).mean()


def reference_kd(student_logits, teacher_logits, temperature):
    """``nn.KLDivLoss()(log_softmax(s/T), softmax(t/T)) * T^2``, the default ``reduction='mean'``."""
    with warnings.catch_warnings():  # torch warns that 'mean' is not the true KL; the public code used it
        warnings.simplefilter("ignore")
        kl = F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                      F.softmax(teacher_logits / temperature, dim=1), reduction="mean")
    return kl * temperature ** 2


class BlockHooks:
    """Every BasicBlock's ``conv1`` output and ``conv2`` input, appended to lists on each forward."""

    def __init__(self, model):
        self.conv1_out, self.conv2_in, self._handles = [], [], []
        for name, module in model.named_modules():
            if name.count(".") == 1 and name.startswith("layer"):  # layer1.0 ... layer4.1
                self._handles.append(module.conv1.register_forward_hook(
                    lambda m, i, o: self.conv1_out.append(o)))
                self._handles.append(module.conv2.register_forward_hook(
                    lambda m, i, o: self.conv2_in.append(i[0])))

    def clear(self):
        self.conv1_out, self.conv2_in = [], []

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()


class ReferenceStep:
    """One ASD step the public code's way: fp32, hooks on every block, masked ASL, ``.item()`` at the end."""

    def __init__(self, teacher, student, optimizer, temperature=40.0, eps=0.1):
        self.teacher, self.student, self.optimizer = teacher.eval(), student, optimizer
        self.temperature, self.eps = temperature, eps
        self.t_hooks, self.s_hooks = BlockHooks(teacher), BlockHooks(student)

    def losses(self, x):
        """(KD loss, mean ASL over the blocks' conv1 outputs) of a float batch, as tensors."""
        self.t_hooks.clear()
        self.s_hooks.clear()
        with torch.no_grad():
            t_logits = self.teacher(x)
        s_logits = self.student(x)
        kd = reference_kd(s_logits, t_logits, self.temperature)
        pairs = list(zip(self.t_hooks.conv1_out, self.s_hooks.conv1_out))
        asl = sum(reference_asl(t, s, self.eps) for t, s in pairs) / len(pairs)
        return kd, asl

    def step(self, x, kd_weight, asl_weight):
        """One optimisation step; returns (KD, ASL) as Python floats, a host sync every step."""
        kd, asl = self.losses(x)
        loss = kd_weight * kd + asl_weight * asl
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return kd.item(), asl.item()

    def close(self):
        self.t_hooks.remove()
        self.s_hooks.remove()
