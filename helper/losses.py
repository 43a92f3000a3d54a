"""Losses of Attention Shifting Distillation, as small pure functions (SPEC sections 4 and 5)."""
import torch
import torch.nn.functional as F


def attention_shifting_loss(teacher_feat, student_feat, eps=0.1):
    """Attention Shifting Loss of one layer (SPEC section 4), the mean over every neuron of the batch.

        t' = t / |detach(t)|        where t != 0
        t' = (sign(s) - 1) * eps    where t == 0
        s' = s / |detach(s)|        where s != 0
        s' = s (= 0)                where s == 0
        ASL = mean over all elements of (1 + t' * s')^2

    Same signs give 4 and push ``s`` to the other sign; opposite signs give 0. The teacher is frozen,
    so only ``s'`` carries gradient (d ASL / d s = 2 (1 + t's') t' / |s| / numel where s != 0, and
    2 t' / numel where s == 0). Computed in fp32 whatever the input dtype, with arithmetic only: no
    boolean-mask indexing, no host sync, so it fuses under ``torch.compile``.

    Implementation (for speed; the values and gradients are those of the formula): ``t / |t|`` is
    ``sign(t)`` and ``s / |s|`` is ``sign(s)``, so value and gradient are computed together in one
    forward pass (``_ASLFunction``), which keeps only the gradient for backward. On the CPU the pass
    runs in cache-sized chunks of arithmetic ops (``torch.where`` and comparisons are several times
    slower there than a multiply).
    """
    if teacher_feat.shape != student_feat.shape:
        raise ValueError(f"teacher and student features differ in shape: "
                         f"{tuple(teacher_feat.shape)} vs {tuple(student_feat.shape)}")
    return _ASLFunction.apply(teacher_feat.detach().float(), student_feat.float(), float(eps))


# Elements per chunk of the CPU forward: 64K fp32 = 256 KiB per temporary, so the temporaries
# of one chunk stay in L2 instead of streaming each full activation through memory a dozen times.
_CPU_CHUNK = 1 << 16


def _asl_chunk(t, s, eps, grad_out, one):
    """Sum of (1 + t's')^2 over a flat chunk; writes (1 + t's') t' / |s| (t' where s == 0) into ``grad_out``.

    Every select is arithmetic on signs, exact for every case of the formula: ``zt = eps * (1 - sign(t)^2)``
    is eps where t == 0, so ``t' = sign(t) - zt + zt * sign(s)``; with ``p = t's'``, (1 + p)^2 sums to
    n + sum(p) + sum(p + p^2); ``zs = 1 - sign(s)^2`` is 1 where s == 0, where ``p + p^2`` is 0, so
    ``(p + p^2 + zs t') / (s + zs)`` is (1 + t's') t' / |s| where s != 0 and t' where s == 0.
    """
    ss = torch.sign(s)
    st = torch.sign(t)
    zt = torch.addcmul(one * eps, st, st, value=-eps)       # eps where t == 0, else 0
    tp = torch.addcmul(st.sub_(zt), zt, ss)                 # t'
    p = tp * ss                                             # t's'
    num = torch.addcmul(p, p, p)                            # (1 + t's') t's'
    value = p.sum() + num.sum() + s.numel()
    zs = torch.addcmul(one, ss, ss, value=-1.0)             # 1 where s == 0, else 0
    torch.div(num.addcmul_(zs, tp), zs.add_(s), out=grad_out)
    return value


def _flat_views(t, s):
    """``t`` and ``s`` in one dense memory layout (``s``'s when it has one), a gradient buffer, and 1-D views of all three."""
    if s.dim() == 4 and not s.is_contiguous() and s.is_contiguous(memory_format=torch.channels_last):
        fmt = torch.channels_last
    else:
        fmt, s = torch.contiguous_format, s.contiguous()
    t = t.contiguous(memory_format=fmt)
    grad = torch.empty_like(s, memory_format=fmt)
    if fmt is torch.channels_last:
        return grad, *(x.permute(0, 2, 3, 1).reshape(-1) for x in (t, s, grad))
    return grad, t.view(-1), s.view(-1), grad.view(-1)


class _ASLFunction(torch.autograd.Function):
    """ASL with its gradient computed in the forward pass; backward is one multiply."""

    @staticmethod
    def forward(ctx, t, s, eps):
        grad, t_flat, s_flat, grad_flat = _flat_views(t, s)
        n = s_flat.numel()
        one = torch.ones((), dtype=s.dtype, device=s.device)
        chunk = _CPU_CHUNK if s.device.type == "cpu" and not torch.compiler.is_compiling() else max(n, 1)
        total = torch.zeros((), dtype=s.dtype, device=s.device)
        for i in range(0, n, chunk):
            total = total + _asl_chunk(t_flat[i:i + chunk], s_flat[i:i + chunk], eps, grad_flat[i:i + chunk], one)
        ctx.save_for_backward(grad)
        ctx.scale = 2.0 / n if n else float("nan")
        return total / n if n else total * float("nan")

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return None, grad * (grad_loss * ctx.scale), None


def kd_loss(student_logits, teacher_logits, temperature, reduction="mean"):
    """Knowledge-distillation loss (SPEC section 5): ``KL(softmax(t/T) || softmax(s/T)) * T^2``.

    ``reduction='mean'`` averages the KL over batch x classes, as PyTorch's ``KLDivLoss()`` default in
    the public code does (per-sample KL / num_classes); the paper's learning rate and its "KD loss
    reaches 1.0" threshold were tuned on that scale. ``'batchmean'`` is the textbook per-sample KL.
    The teacher's logits carry no gradient; the loss is computed in fp32.
    """
    if reduction not in ("mean", "batchmean"):
        raise ValueError(f"reduction must be 'mean' or 'batchmean', not {reduction!r}")
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    kl = log_p_teacher.exp() * (log_p_teacher - log_p_student)  # per sample and class
    kl = kl.mean() if reduction == "mean" else kl.sum() / kl.shape[0]
    return kl * temperature ** 2


def mean_attention_shifting_loss(teacher_feats, student_feats, eps=0.1):
    """``(1/|L|) * sum over hooked layers of ASL_l`` (SPEC section 4): dicts keyed by layer name."""
    losses = [attention_shifting_loss(teacher_feats[name], student_feats[name], eps) for name in student_feats]
    return torch.stack(losses).mean()
