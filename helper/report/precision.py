"""How far ASL's gradient in a given precision is from the same gradient in fp64 (docs/gpu.md, "ASD's precision").

ASL's gradient with respect to a student's convolution output ``s`` is 2 (1 + t's') t' / |s| (SPEC section 4): the
elements with the smallest |s| carry most of it, so a rounding error far below a convolution's scale can turn the
gradient's direction. The measure: a teacher, a student ``--noise`` (relative) away from it, a batch of images; the
gradient of the mean ASL over the 8 hooked ``conv1`` layers with respect to the student's weights, computed in fp32,
in bf16 autocast (on the CPU it rounds as a GPU's bf16 does) and, on CUDA, in fp32 with TF32, each against the fp64
gradient of the same models on the same images: their cosine; and the same for the KD loss (T 40), for comparison.

    python -m helper.report.precision --read_dir runs/teachers/adba --finetunedata ../shared/data/cifar100.npz
"""
import argparse
import copy

import torch

from helper.data.images import load_splits, to_float
from helper.data.teacher_dir import read_teacher
from helper.run.errors import exits_cleanly
from helper.run.system import select_device
from helper.train.features import DEFAULT_LAYERS, FeatureHooks
from helper.train.losses import attention_shifting_loss, kd_loss


def reference_asl(t, s, eps=0.1):
    """ASL by its formula (SPEC section 4) in the inputs' dtype (fp64 for the reference):
    ``mean (1 + t' s / |detach(s)|)^2`` with ``t' = sign(t)``, ``(sign(s) - 1) eps`` where t == 0."""
    tp = torch.where(t != 0, torch.sign(t), (torch.sign(s.detach()) - 1) * eps)
    return ((1 + tp * torch.where(s != 0, s / s.detach().abs(), s)) ** 2).mean()


def asl_weight_grad(teacher, student, x, amp=None, fp64=False):
    """The gradient of the mean ASL over the hooked layers (``DEFAULT_LAYERS``) with respect to the student's
    weights, as one fp64 vector: ``amp`` an autocast dtype or None; ``fp64`` takes ``reference_asl`` (the package's
    kernel computes in fp32)."""
    t_hooks, s_hooks = FeatureHooks(teacher, DEFAULT_LAYERS), FeatureHooks(student, DEFAULT_LAYERS)
    try:
        with torch.autocast(x.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            with torch.no_grad():
                teacher(x)
            student(x)
        t_feats, s_feats = t_hooks.pop(), s_hooks.pop()
    finally:
        t_hooks.remove()
        s_hooks.remove()
    asl = reference_asl if fp64 else attention_shifting_loss
    loss = sum(asl(t_feats[n], s_feats[n]) for n in s_feats) / len(s_feats)
    student.zero_grad()
    loss.backward()
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).double().flatten()
                      for p in student.parameters()])


def kd_weight_grad(teacher, student, x, amp=None, temperature=40.0):
    """The gradient of the package's KD loss (T 40, class mean) with respect to the student's weights, fp64 vector."""
    with torch.autocast(x.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
        with torch.no_grad():
            t = teacher(x)
        s = student(x)
    student.zero_grad()
    kd_loss(s.double() if x.dtype == torch.float64 else s, t, temperature).backward()
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).double().flatten()
                      for p in student.parameters()])


def cosines(teacher, x, noise=0.02, seed=0, grad=asl_weight_grad):
    """``{precision: cosine with the fp64 gradient}`` of ``grad`` (ASL's, or ``kd_weight_grad``) for a student
    ``noise`` (relative to each tensor's mean magnitude) away from ``teacher``, in training mode, on ``x`` (floats
    on the teacher's device)."""
    torch.manual_seed(seed)
    teacher = teacher.eval()
    student = copy.deepcopy(teacher).train()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(noise * p.abs().mean() * torch.randn_like(p))
    fp64 = {"fp64": True} if grad is asl_weight_grad else {}
    ref = grad(copy.deepcopy(teacher).double(), copy.deepcopy(student).double(), x.double(), **fp64)
    settings = {"fp32": (None, False), "bf16": (torch.bfloat16, False)}
    if x.device.type == "cuda":
        settings["fp32 TF32"] = (None, True)
    out = {}
    for name, (amp, tf32) in settings.items():
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        try:
            g = grad(copy.deepcopy(teacher), copy.deepcopy(student), x, amp)
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
        out[name] = float(g @ ref / (g.norm() * ref.norm()))
    return out


@exits_cleanly
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--read_dir", required=True, help="a teacher folder (checkpoint.pkl)")
    p.add_argument("--finetunedata", default="cifar100", help="the images: cifar100, synthetic or an .npz")
    p.add_argument("--images", type=int, default=128, help="batch size of the measure")
    p.add_argument("--noise", type=float, nargs="+", default=[0.02, 0.1], help="student's distance from the teacher")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    device = select_device(args.device)
    teacher = read_teacher(args.read_dir)[0].to(device)
    images = load_splits(args.finetunedata, role="ood", flag="--finetunedata", synthetic_train=args.images,
                         synthetic_test=1)[0].x[:args.images]
    x = to_float(images).to(device)
    print(f"{args.read_dir}: {len(x)} images of {args.finetunedata}, device {device}, torch {torch.__version__}")
    for noise in args.noise:
        for name, grad in (("ASL", asl_weight_grad), ("KD", kd_weight_grad)):
            c = cosines(teacher, x, noise, args.seed, grad)
            print(f"student {noise:g} away, {name} gradient: cosine with fp64  "
                  + "  ".join(f"{k} {v:.4f}" for k, v in c.items()))


if __name__ == "__main__":
    main()
