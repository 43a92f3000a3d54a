"""Speed never changes results (issue 4, item 4): the fast path against a plain fp32 path.

What the fast path changes, and what each test pins down:
- ASL by sign arithmetic with its gradient computed in the forward pass, chunked on the CPU
  (``helper.train.losses``) -> same value and gradient as the SPEC formula written with autograd, and as
  the public code's boolean-mask ASL (``helper.jobs.reference``);
- channels_last models and activations, augmentation by one gather on the device
  -> same KD and ASL on a fixed batch as contiguous fp32 models fed per-image torchvision transforms;
- all of it together -> the same selected epoch (and nearly the same losses) on a short synthetic run.
"""
import copy
import json
import os
import shutil

import pytest
import torch
import torchvision.transforms.functional as TF

import distri
import helper.defenses.asd
import helper.run.system
import helper.train.losses as L
from helper.data import images as D
from helper.defenses.asd import Distiller
from helper.jobs.reference import ReferenceStep, reference_asl
from helper.train.losses import attention_shifting_loss
from models import resnet18
from tests import read_json, read_text
from tests.conftest import fast_flags, write_teacher_dir


def plain_asl(teacher_feat, student_feat, eps=0.1):
    """SPEC section 4 written literally, fp32, gradients by autograd (the implementation the fast one replaced)."""
    t = teacher_feat.detach().float()
    s = student_feat.float()
    s_abs = s.detach().abs()
    t_prime = torch.where(t != 0, t / t.abs().clamp_min(torch.finfo(t.dtype).tiny), (torch.sign(s.detach()) - 1) * eps)
    s_prime = torch.where(s_abs != 0, s / s_abs.clamp_min(torch.finfo(s.dtype).tiny), s)
    return (1 + t_prime * s_prime).pow(2).mean()


def _with_zeros(shape, seed, share=0.2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    return x.masked_fill(torch.rand(shape, generator=g) < share, 0.0)


@pytest.mark.parametrize("impl", [plain_asl, reference_asl], ids=["spec_formula", "public_code_masks"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "mixed"])
def test_fast_asl_equals_slow_asl_value_and_gradient(impl, layout, monkeypatch):
    # 3 chunks of the CPU path (the chunk boundary falls inside the tensor), zeros in t and s, eps != 0.1
    monkeypatch.setattr(L, "_CPU_CHUNK", 1000)
    t, s = _with_zeros((2, 7, 13, 11), 0), _with_zeros((2, 7, 13, 11), 1)
    if layout in ("channels_last", "mixed"):
        s = s.contiguous(memory_format=torch.channels_last)
    if layout == "channels_last":
        t = t.contiguous(memory_format=torch.channels_last)
    s_fast, s_slow = s.clone().requires_grad_(), s.clone().requires_grad_()
    fast, slow = attention_shifting_loss(t, s_fast, eps=0.3), impl(t, s_slow, eps=0.3)
    (3 * fast).backward()
    (3 * slow).backward()
    torch.testing.assert_close(fast, slow)
    torch.testing.assert_close(s_fast.grad, s_slow.grad)
    assert (s == 0).any() and (t == 0).any() and s_fast.grad[s == 0].abs().sum() > 0


def test_fast_asl_on_real_activations_in_chunks(monkeypatch):
    """Hooked conv1 outputs of a ResNet (exact zeros where a receptive field is all ReLU zeros)."""
    monkeypatch.setattr(L, "_CPU_CHUNK", 4096)
    torch.manual_seed(0)
    teacher = resnet18(10, 4).to(memory_format=torch.channels_last)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1 * torch.randn_like(p))
    d = Distiller(teacher, student, torch.optim.SGD(student.parameters(), lr=0.0), ["layer*.*.conv1"])
    x = torch.rand(6, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        teacher(x)
    student(x)
    tf, sf = d.t_hooks.pop(), d.s_hooks.pop()
    for name in d.s_hooks.layers:
        s1 = sf[name].detach().clone().requires_grad_()
        s2 = sf[name].detach().clone().requires_grad_()
        a, b = attention_shifting_loss(tf[name], s1), plain_asl(tf[name], s2)
        a.backward()
        b.backward()
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(s1.grad, s2.grad)
    d.close()


def _reference_augment(x, seed, pad=4):
    """torchvision's RandomCrop(32, padding=4) + RandomHorizontalFlip, one image at a time, on the offsets augment draws."""
    g = torch.Generator().manual_seed(seed)
    b = len(x)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    flipped = torch.rand(b, generator=g) < 0.5
    out = []
    for img, i, j, f in zip(x, dy.tolist(), dx.tolist(), flipped.tolist()):
        img = TF.crop(TF.pad(img, [pad]), i, j, 32, 32)
        out.append(TF.hflip(img) if f else img)
    return torch.stack(out).float() / 255


def test_batch_augment_equals_per_image_torchvision_transforms():
    x = D.synthetic_split("ood", 32, "train", seed=3).x
    fast = D.augment(x, torch.Generator().manual_seed(7))
    torch.testing.assert_close(fast, _reference_augment(x, 7), rtol=0, atol=0)


def test_fast_step_losses_equal_public_code_step_losses():
    """Channels_last models + fast ASL + kd_loss against contiguous fp32 models + masked ASL + F.kl_div."""
    torch.manual_seed(0)
    teacher = resnet18(10, 8)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.2 * torch.randn_like(p))
    ref = ReferenceStep(copy.deepcopy(teacher), copy.deepcopy(student), None)
    cl = torch.channels_last
    fast_teacher, fast_student = teacher.to(memory_format=cl), student.to(memory_format=cl)
    fast = Distiller(fast_teacher, fast_student, None, ["layer*.*.conv1"])
    x = D.augment(D.synthetic_split("ood", 16, "train", seed=1).x, torch.Generator().manual_seed(0))
    kd_fast, asl_fast = fast.losses(x.contiguous(memory_format=cl))
    kd_ref, asl_ref = ref.losses(x)
    torch.testing.assert_close(kd_fast, kd_ref, rtol=1e-3, atol=0)  # KL of near-uniform softmaxes (T=40): cancellation
    torch.testing.assert_close(asl_fast, asl_ref, rtol=1e-4, atol=1e-6)
    # KD's gradients reach the student the same way. (ASL's are compared per tensor above: across memory
    # layouts the convolutions round differently, and 1/|s| magnifies that for activations near 0.)
    kd_fast.backward()
    kd_ref.backward()
    for (name, p_fast), p_ref in zip(fast_student.named_parameters(), ref.student.parameters()):
        # KD at T=40 is a small difference of nearly equal softmaxes, so its gradient keeps few significant digits:
        # compare against the layer's scale. With OMP_NUM_THREADS=1 the CPU takes other convolution kernels and the
        # two layouts then differ by up to 2.5% of a layer's largest gradient (2 threads: 0.4%); a wrong gradient
        # (a lost T^2, a sign, a missing term) is off by 100%.
        scale = p_ref.grad.abs().max().item()
        torch.testing.assert_close(p_fast.grad, p_ref.grad, rtol=0, atol=5e-2 * scale, msg=name)
    fast.close()
    ref.close()


def _run(tmp_path, name, teacher_dir, extra):
    out = tmp_path / name
    flags = fast_flags(teacher_dir, out, epochs=4)
    flags[flags.index("--subset_rate") + 1] = "1.0"
    distri.main(flags + ["--select_from", "0"] + extra)
    rows = [json.loads(line) for line in read_text(os.path.join(out, "log.jsonl")).splitlines()]
    return rows, read_json(os.path.join(out, "results.json"))


def _same_run(fast_rows, fast, plain_rows, plain):
    assert fast["best_epoch"] == plain["best_epoch"]
    assert fast["kd_loss"] == min(r["kd_loss"] for r in fast_rows)
    # rel 1e-3: after training steps the two paths differ by summation order only, which moves KD at T=40 (a small
    # difference of near-uniform softmaxes) by up to ~1.3e-4 relative between Intel and AMD kernels or thread counts
    for a, b in zip(fast_rows, plain_rows):
        assert a["kd_loss"] == pytest.approx(b["kd_loss"], rel=1e-3)
        assert (a["asl"] is None) == (b["asl"] is None)
        if a["asl"] is not None:
            assert a["asl"] == pytest.approx(b["asl"], rel=1e-3)
        assert abs(a["acc"] - b["acc"]) <= 1 / 128


@pytest.fixture
def teacher8(tmp_path):
    return write_teacher_dir(tmp_path / "teacher", width=8)


def test_short_asd_run_with_the_autograd_asl_selects_the_same_epoch(tmp_path, teacher8, monkeypatch):
    """KD + ASL (weights 1 and 1) for 4 epochs: fast ASL, then the SPEC formula by autograd, same layout.

    The layout stays fixed here on purpose: ASL's gradient is (1 + t's') t' / |s|, so a rounding-level
    change of an activation near 0 (another memory layout, thread count or GPU) is magnified, and ASD
    trajectories that differ only in the convolutions' rounding drift apart by a few percent of KD within
    an epoch or two; layouts are compared on KD runs and on fixed batches instead.
    """
    monkeypatch.setattr(helper.run.system, "memory_format", lambda device: torch.contiguous_format)
    extra = ["--ratio_type", "fix", "--new_loss_ratio", "1.0"]
    fast_rows, fast = _run(tmp_path, "fast", teacher8, extra)
    monkeypatch.setattr(helper.defenses.asd, "attention_shifting_loss", plain_asl)
    plain_rows, plain = _run(tmp_path, "plain", teacher8, extra)
    assert all(r["asl"] is not None for r in fast_rows)
    _same_run(fast_rows, fast, plain_rows, plain)


def test_short_kd_run_in_channels_last_selects_the_same_epoch(tmp_path, teacher8, monkeypatch):
    """Plain KD for 4 epochs: the channels_last fast path, then contiguous models (the plain fp32 path)."""
    fast_rows, fast = _run(tmp_path, "fast", teacher8, ["--ratio_type", "fix"])
    monkeypatch.setattr(helper.run.system, "memory_format", lambda device: torch.contiguous_format)
    plain_rows, plain = _run(tmp_path, "plain", teacher8, ["--ratio_type", "fix"])
    _same_run(fast_rows, fast, plain_rows, plain)


def test_cpu_kernel_fast_chunks_and_chunks_with_zeros_give_the_formula(monkeypatch):
    """Chunk 0 has no zero (five-op fast path); chunk 1 has zeros in t, chunk 2 in s, chunk 3 a product that
    underflows to 0 although neither factor is 0: those three must go to the exact kernel."""
    monkeypatch.setattr(L, "_CPU_CHUNK", 1000)
    calls = []
    exact = L._asl_terms_chunk_with_zeros
    monkeypatch.setattr(L, "_asl_terms_chunk_with_zeros", lambda *a: calls.append(1) or exact(*a))
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(3500, generator=g), torch.randn(3500, generator=g)
    t[1000:1100] = 0.0
    s[2000:2100] = 0.0
    t[3000], s[3000], t[3001], s[3001] = 1e-30, 1e-30, -1e-30, 1e-30
    s_fast, s_slow = s.clone().requires_grad_(), s.clone().requires_grad_()
    fast, slow = attention_shifting_loss(t, s_fast), plain_asl(t, s_slow)
    fast.backward()
    slow.backward()
    assert len(calls) == 3
    torch.testing.assert_close(fast, slow)
    torch.testing.assert_close(s_fast.grad, s_slow.grad)
    assert s_fast.grad[3000] > 1e20 and s_fast.grad[3001] == 0  # same signs: 4 / |s| / n; opposite: 0


def test_where_formula_kernel_equals_the_cpu_kernel():
    """``asl_terms`` (the torch.where formula, run as is on a GPU and fused by --compile) against the CPU kernel."""
    t, s = _with_zeros((3, 5, 7, 9), 0), _with_zeros((3, 5, 7, 9), 1)
    total, grad = L.asl_terms(t, s, 0.3)
    total_cpu, grad_cpu = L._chunked_asl_terms(t, s, 0.3)
    torch.testing.assert_close(total, total_cpu)
    torch.testing.assert_close(grad, grad_cpu)


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")), reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_asl_equals_the_formula():
    t, s = _with_zeros((2, 6, 5, 5), 2), _with_zeros((2, 6, 5, 5), 3).contiguous(memory_format=torch.channels_last)
    s_fast, s_slow = s.clone().requires_grad_(), s.clone().requires_grad_()
    fast, slow = attention_shifting_loss(t, s_fast, eps=0.2, compiled=True), plain_asl(t, s_slow, eps=0.2)
    fast.backward()
    slow.backward()
    torch.testing.assert_close(fast, slow)
    torch.testing.assert_close(s_fast.grad, s_slow.grad)


def test_asl_backward_runs_once_per_forward():
    s = torch.randn(4, 3).requires_grad_()
    loss = attention_shifting_loss(torch.randn(4, 3), s)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        loss.backward()


def test_asd_gradient_reaches_conv1_in_channels_last():
    """The ASL gradient is added to conv1's gradient in the activations' own layout: no slice of the features
    on the way (its backward would build a zero-filled contiguous gradient, then convert it back per layer)."""
    torch.manual_seed(0)
    cl = torch.channels_last
    teacher = resnet18(10, 4).to(memory_format=cl)
    student = copy.deepcopy(teacher)
    d = Distiller(teacher, student, torch.optim.SGD(student.parameters(), lr=0.0), ["layer*.*.conv1"])
    grads = []
    student.layer1[0].conv1.register_forward_hook(lambda m, i, out: [out.register_hook(grads.append)] and None)
    d.step(torch.rand(4, 3, 32, 32).contiguous(memory_format=cl), 1.0, 1.0)
    assert len(grads) == 1 and grads[0].is_contiguous(memory_format=cl) and not grads[0].is_contiguous()
    d.close()
