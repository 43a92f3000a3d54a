"""Losses of Attention Shifting Distillation, as small pure functions (SPEC sections 4 and 5)."""
import torch
import torch.nn.functional as F

from helper.run.system import CompiledOrEager


def attention_shifting_loss(teacher_feat, student_feat, eps=0.1, compiled=False):
    """Attention Shifting Loss of one layer (SPEC section 4), the mean over every neuron of the batch.

        t' = t / |detach(t)|        where t != 0
        t' = (sign(s) - 1) * eps    where t == 0
        s' = s / |detach(s)|        where s != 0
        s' = s (= 0)                where s == 0
        ASL = mean over all elements of (1 + t' * s')^2

    Same signs give 4 and push ``s`` to the other sign; opposite signs give 0. The teacher is frozen,
    so only ``s'`` carries gradient (d ASL / d s = 2 (1 + t's') t' / |s| / numel where s != 0, and
    2 t' / numel where s == 0). Computed in fp32 whatever the input dtype, without boolean-mask
    indexing and without waiting for a device (the CPU kernel reads one scalar per chunk on the host,
    where there is nothing to wait for).

    Value and gradient are computed together in the forward pass (``_ASLFunction``); backward only
    scales the stored gradient. Three kernels give the same numbers (tests): ``compiled=True`` fuses
    the ``torch.where`` formula (``asl_terms``) into one kernel with ``torch.compile``; on a GPU
    without compile that formula runs as is; on a CPU without compile the formula is rewritten as
    sign arithmetic in cache-sized chunks (``_asl_terms_chunk``), because eager ``torch.where`` is many
    times slower there than a multiply (9-12 times over 7.9M elements on a 2-core Xeon).
    """
    if teacher_feat.shape != student_feat.shape:
        raise ValueError(f"teacher and student features differ in shape: "
                         f"{tuple(teacher_feat.shape)} vs {tuple(student_feat.shape)}")
    return _ASLFunction.apply(teacher_feat.detach().float(), student_feat.float(), float(eps), compiled)


def asl_terms(t, s, eps):
    """``(sum of (1 + t's')^2, d sum / d s / 2)`` over fp32 tensors of one shape, by the formula with ``torch.where``."""
    ss = torch.sign(s)
    tp = torch.where(t != 0, torch.sign(t), (ss - 1) * eps)
    q = 1 + tp * ss
    return (q * q).sum(), torch.where(s != 0, q * tp / s.abs(), tp)


_compiled_asl_terms = None


def _fused_asl_terms(t, s, eps):
    """``asl_terms`` compiled once per process into one fused kernel (eager ``asl_terms`` if compiling fails)."""
    global _compiled_asl_terms
    if _compiled_asl_terms is None:
        _compiled_asl_terms = CompiledOrEager(asl_terms)
    return _compiled_asl_terms(t, s, eps)


# Elements per chunk of the CPU kernel: 64K fp32 = 256 KiB per temporary, so a chunk's temporaries
# stay in L2 instead of streaming each full activation through memory once per op.
_CPU_CHUNK = 1 << 16


def _asl_terms_chunk(t, s, eps, grad_out, one):
    """Sum of (1 + t's')^2 over a flat CPU chunk; writes (1 + t's') t' / |s| (t' where s == 0) into ``grad_out``.

    Fast case, no ``t * s`` is 0: then ``t' = sign(t)`` and ``s' = sign(s)``, so with ``h = sign(t * s)``
    the term is (1 + h)^2 = 2 (1 + h) and the gradient (1 + h) t' / |s| = (1 + h) / s: five ops and a check.
    Whether some ``t * s`` is 0 (an exact zero in t or s, an underflow; NaN counts too) is read on the
    host, which on the CPU costs no wait; such a chunk goes to ``_asl_terms_chunk_with_zeros``. A trained
    teacher and student have no zeros there; a student whose units died under ASL has many.
    Returns ``(sum h, True)`` in the fast case (the caller adds the constant), ``(sum of terms, False)`` otherwise.
    """
    h = torch.mul(t, s).sign_()
    if torch.dot(h, h).item() != h.numel():
        return _asl_terms_chunk_with_zeros(t, s, eps, grad_out, one), False
    sum_h = h.sum()
    torch.div(h.add_(1), s, out=grad_out)
    return sum_h, True


def _asl_terms_chunk_with_zeros(t, s, eps, grad_out, one):
    """``_asl_terms_chunk`` for any chunk, zeros included, in twelve ops of sign arithmetic (no ``torch.where``).

    ``zt = eps * (1 - sign(t)^2)`` is eps where t == 0, so ``t' = sign(t) - zt + zt * sign(s)``; with
    ``p = t's'``, (1 + p)^2 sums to n + sum(p) + sum(p + p^2); ``zs = 1 - sign(s)^2`` is 1 where s == 0,
    where ``p + p^2`` is 0, so ``(p + p^2 + zs t') / (s + zs)`` is (1 + t's') t' / |s| where s != 0 and
    t' where s == 0.
    """
    ss = torch.sign(s)
    st = torch.sign(t)
    zt = torch.addcmul(one, st, st, value=-1.0).mul_(eps)   # eps where t == 0, else 0
    tp = torch.addcmul(st.sub_(zt), zt, ss)                 # t'
    p = tp * ss                                             # t's'
    num = torch.addcmul(p, p, p)                            # (1 + t's') t's'
    total = p.sum() + num.sum() + p.numel()
    zs = torch.addcmul(one, ss, ss, value=-1.0)             # 1 where s == 0, else 0
    torch.div(num.addcmul_(zs, tp), zs.add_(s), out=grad_out)
    return total


def _chunked_asl_terms(t, s, eps):
    """``asl_terms`` on the CPU: the same two results, chunk by chunk, in ``s``'s memory layout."""
    grad, t_flat, s_flat, grad_flat = _flat_views(t, s)
    one = torch.ones((), dtype=s.dtype)
    fast, with_zeros, n_fast = [], [], 0
    for tc, sc, gc in zip(*(x.split(_CPU_CHUNK) for x in (t_flat, s_flat, grad_flat))):
        part, is_fast = _asl_terms_chunk(tc, sc, eps, gc, one)
        if is_fast:
            fast.append(part)
            n_fast += sc.numel()
        else:
            with_zeros.append(part)
    total = torch.zeros((), dtype=s.dtype)
    if fast:  # sum of 2 (1 + h)
        total = total + 2 * torch.stack(fast).sum() + 2 * n_fast
    if with_zeros:
        total = total + torch.stack(with_zeros).sum()
    return total, grad


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
    """ASL with its gradient computed in the forward pass; backward scales that gradient in place.

    The gradient buffer is handed to autograd without a copy, so autograd can add the other gradient
    of the same activation into it in place. It serves one backward: a second backward through the
    same graph (``retain_graph=True``) raises instead of reusing a scaled buffer.
    """

    @staticmethod
    def forward(ctx, t, s, eps, compiled):
        if compiled:
            total, grad = _fused_asl_terms(t, s, eps)
        elif s.device.type == "cpu":
            total, grad = _chunked_asl_terms(t, s, eps)
        else:
            total, grad = asl_terms(t, s, eps)
        n = s.numel()
        ctx.grad, ctx.scale = grad, (2.0 / n if n else float("nan"))
        return total / n if n else total * float("nan")

    @staticmethod
    def backward(ctx, grad_loss):
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError("attention_shifting_loss supports one backward per forward: its gradient buffer "
                               "is scaled in place (compute the loss again instead of retain_graph=True)")
        return None, grad.mul_(grad_loss * ctx.scale), None, None


def kd_loss(student_logits, teacher_logits, temperature, reduction="mean"):
    """Knowledge-distillation loss (SPEC section 5): ``KL(softmax(t/T) || softmax(s/T)) * T^2``.

    ``reduction='mean'`` averages the KL over batch x classes, as PyTorch's ``KLDivLoss()`` default in
    the public code does (per-sample KL / num_classes); the paper's learning rate and its "KD loss
    reaches 1.0" threshold were tuned on that scale. ``'batchmean'`` is the textbook per-sample KL.
    The teacher's logits carry no gradient; the loss is computed in fp32.
    """
    if reduction not in ("mean", "batchmean"):
        raise ValueError(f"reduction must be 'mean' or 'batchmean', not {reduction!r}")
    per_sample = kd_per_sample(student_logits, teacher_logits, temperature)
    return per_sample.mean() / student_logits.shape[1] if reduction == "mean" else per_sample.mean()


def mean_attention_shifting_loss(teacher_feats, student_feats, eps=0.1, layers=None, asl=attention_shifting_loss):
    """``(1/|L|) * sum over hooked layers of ASL_l`` (SPEC section 4): dicts keyed by layer name, over ``layers``
    (default: the student's keys, in order); ``asl`` computes one layer's (ASD passes its compiled kernel)."""
    layers = list(student_feats) if layers is None else layers
    return sum(asl(teacher_feats[n], student_feats[n], eps) for n in layers) / len(layers)


def kd_per_sample(student_logits, teacher_logits, temperature):
    """Per-sample KD: ``sum_c softmax(t/T)_c (log softmax(t/T)_c - log softmax(s/T)_c) * T^2``, shape (batch,).

    Its batch mean is ``kd_loss(..., reduction='batchmean')``. fp32; the teacher's logits carry no gradient.
    """
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    return (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(1) * temperature ** 2


def hard_label_ce(student_logits, teacher_logits):
    """``CE(s, argmax t)``: cross-entropy against the teacher's predicted labels (the public ASD code's ``CEwater``)."""
    return F.cross_entropy(student_logits.float(), teacher_logits.detach().argmax(1))


def raw_attention_map(feature, p=2.0):
    """The attention map of a (B, C, H, W) feature before any normalisation: ``A = sum_c |F_c|^p``, (B, H, W), fp32."""
    return feature.float().abs().pow(p).sum(1)


def attention_map(feature, p=2.0):
    """NAD's attention map of a (B, C, H, W) feature: ``A = sum_c |F_c|^p`` (``raw_attention_map``), flattened to
    (B, H*W) and divided by its L2 norm (+1e-6): ``A / (||A||_2 + 1e-6)``. Computed in fp32."""
    a = raw_attention_map(feature, p).flatten(1)
    return a / (a.norm(dim=1, keepdim=True) + 1e-6)


def attention_distillation_loss(student_feature, teacher_feature, p=2.0):
    """NAD's attention loss of one layer: ``mean over batch and positions of (A(F_s) - A(F_t))^2``."""
    return (attention_map(student_feature, p) - attention_map(teacher_feature.detach(), p)).pow(2).mean()
