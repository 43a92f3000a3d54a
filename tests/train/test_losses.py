"""ASL and KD against values worked out by hand (SPEC sections 4 and 5)."""
import math

import pytest
import torch

from helper.train.losses import attention_shifting_loss, kd_loss, mean_attention_shifting_loss

# One neuron per case, eps = 0.1:
#   t=1,  s=2    t'=1,    s'=1   -> (1+1)^2     = 4
#   t=-2, s=-1   t'=-1,   s'=-1  -> (1+1)^2     = 4
#   t=0,  s=1    t'=0,    s'=1   -> 1
#   t=0,  s=-1   t'=-0.2, s'=-1  -> (1+0.2)^2   = 1.44
#   t=0,  s=0    t'=-0.1, s'=0   -> 1
#   t=3,  s=-0.5 t'=1,    s'=-1  -> 0
T = [1.0, -2.0, 0.0, 0.0, 0.0, 3.0]
S = [2.0, -1.0, 1.0, -1.0, 0.0, -0.5]
EXPECTED = (4 + 4 + 1 + 1.44 + 1 + 0) / 6
# d ASL / d s = 2 (1 + t's') t' / |s| / 6 where s != 0, and 2 t' / 6 where s == 0 (s' = s there)
EXPECTED_GRAD = [2 * 2 * 1 / 2 / 6, 2 * 2 * -1 / 1 / 6, 0.0, 2 * 1.2 * -0.2 / 1 / 6, 2 * -0.1 / 6, 0.0]


def test_asl_hand_computed_value_with_zeros():
    loss = attention_shifting_loss(torch.tensor(T), torch.tensor(S), eps=0.1)
    assert loss.item() == pytest.approx(EXPECTED, rel=1e-6)


def test_asl_gradient_and_its_direction():
    t = torch.tensor(T, requires_grad=True)
    s = torch.tensor(S, requires_grad=True)
    attention_shifting_loss(t, s, eps=0.1).backward()
    torch.testing.assert_close(s.grad, torch.tensor(EXPECTED_GRAD))
    # same signs: a descent step moves s towards the other sign
    assert s.grad[0] > 0 and s.grad[1] < 0
    # opposite signs: nothing to push
    assert s.grad[5] == 0
    # the teacher is frozen: no gradient into it
    assert t.grad is None


def test_asl_eps_only_matters_where_teacher_is_zero():
    t, s = torch.tensor([0.0, 0.0]), torch.tensor([-1.0, 0.0])
    # eps=0.5: t'=-1 with s'=-1 -> (1+1)^2 = 4; t'=-0.5 with s'=0 -> 1
    assert attention_shifting_loss(t, s, eps=0.5).item() == pytest.approx((4 + 1) / 2)
    t2, s2 = torch.tensor([2.0, -3.0]), torch.tensor([5.0, 4.0])
    assert attention_shifting_loss(t2, s2, eps=0.5).item() == attention_shifting_loss(t2, s2, eps=0.0).item() == 2.0


def test_asl_is_the_mean_over_the_whole_batch_not_sample_zero():
    t = torch.ones(3, 2, 4, 4)
    s = torch.ones(3, 2, 4, 4)
    s[1:] = -1  # samples 1 and 2 already flipped: 0 there; sample 0 alone would give 4
    assert attention_shifting_loss(t, s).item() == pytest.approx(4 / 3)


def test_asl_is_fp32_and_finite_for_bf16_inputs():
    torch.manual_seed(0)
    t, s = torch.randn(4, 8, 5, 5).bfloat16(), torch.randn(4, 8, 5, 5).bfloat16().requires_grad_()
    loss = attention_shifting_loss(t, s)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(s.grad).all()
    expected = attention_shifting_loss(t.float(), s.detach().float())
    torch.testing.assert_close(loss, expected)


def test_asl_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="differ in shape"):
        attention_shifting_loss(torch.zeros(2, 3), torch.zeros(3, 2))


def test_mean_asl_over_layers():
    feats_t = {"a": torch.tensor([1.0]), "b": torch.tensor([1.0])}
    feats_s = {"a": torch.tensor([1.0]), "b": torch.tensor([-1.0])}  # 4 and 0
    assert mean_attention_shifting_loss(feats_t, feats_s).item() == pytest.approx(2.0)


# KD: teacher logits T*[ln 3, 0] give p_t = (3/4, 1/4); student logits 0 give (1/2, 1/2).
# KL = 3/4 ln(3/2) + 1/4 ln(1/2) per sample.
KL = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)


@pytest.mark.parametrize("temperature", [1.0, 40.0])
def test_kd_loss_hand_computed_mean_and_batchmean(temperature):
    teacher = torch.tensor([[temperature * math.log(3.0), 0.0]] * 4)
    student = torch.zeros(4, 2)
    mean = kd_loss(student, teacher, temperature, reduction="mean")
    batchmean = kd_loss(student, teacher, temperature, reduction="batchmean")
    assert mean.item() == pytest.approx(KL / 2 * temperature ** 2, rel=1e-5)  # / classes
    assert batchmean.item() == pytest.approx(KL * temperature ** 2, rel=1e-5)


def test_kd_loss_zero_for_equal_logits_and_gradient_only_to_student():
    torch.manual_seed(0)
    teacher = torch.randn(5, 10, requires_grad=True)
    student = teacher.detach().clone().requires_grad_()
    assert kd_loss(student, teacher, 40.0).item() == pytest.approx(0.0, abs=1e-7)
    student2 = torch.randn(5, 10, requires_grad=True)
    kd_loss(student2, teacher, 4.0).backward()
    assert teacher.grad is None
    # d/ds of T^2 * mean KL = T^2 * (p_s - p_t) / T / (B * C)
    expected = 16.0 * (torch.softmax(student2 / 4, 1) - torch.softmax(teacher / 4, 1)) / 4 / 50
    torch.testing.assert_close(student2.grad, expected.detach())


def test_kd_loss_rejects_unknown_reduction():
    with pytest.raises(ValueError, match="reduction"):
        kd_loss(torch.zeros(1, 2), torch.zeros(1, 2), 1.0, reduction="sum")
