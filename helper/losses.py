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
    so only ``s'`` carries gradient (d ASL / d s = 2 (1 + t's') t' / |s| / numel where s != 0).
    Computed in fp32 whatever the input dtype, with ``torch.where`` only: no boolean-mask indexing,
    no host sync, so it fuses under ``torch.compile``.
    """
    if teacher_feat.shape != student_feat.shape:
        raise ValueError(f"teacher and student features differ in shape: "
                         f"{tuple(teacher_feat.shape)} vs {tuple(student_feat.shape)}")
    t = teacher_feat.detach().float()
    s = student_feat.float()
    s_abs = s.detach().abs()
    t_prime = torch.where(t != 0, t / t.abs().clamp_min(torch.finfo(t.dtype).tiny),
                          (torch.sign(s.detach()) - 1) * eps)
    s_prime = torch.where(s_abs != 0, s / s_abs.clamp_min(torch.finfo(s.dtype).tiny), s)
    return (1 + t_prime * s_prime).pow(2).mean()


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
