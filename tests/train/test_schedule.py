import pytest
import torch

from helper.train.schedule import LrDrop, asd_ratio, loss_weights, step_lr


@pytest.mark.parametrize("epoch,lam", [(0, 0.0), (9, 0.0), (10, 0.9), (19, 0.9), (20, 0.9), (30, 0.95),
                                       (39, 0.995), (40, 1.0), (299, 1.0)])
def test_asd_ratio_piecewise(epoch, lam):
    assert asd_ratio(epoch) == pytest.approx(lam)


def test_scheduler_weights_include_the_multiplier():
    assert loss_weights(5, "scheduler") == (0.0, 10.0)
    kd, asl = loss_weights(15, "scheduler")
    assert (kd, asl) == (pytest.approx(9.0), pytest.approx(1.0))
    kd, asl = loss_weights(30, "scheduler")
    assert (kd, asl) == (pytest.approx(0.95 * 20), pytest.approx(0.05 * 20))
    assert loss_weights(100, "scheduler") == (20.0, 0.0)


def test_fix_weights_are_the_ratios_without_multiplier():
    assert loss_weights(0, "fix") == (1.0, 0.0)
    assert loss_weights(5, "fix", 0.5, 2.0) == (0.5, 2.0)
    with pytest.raises(ValueError, match="ratio_type"):
        loss_weights(0, "cosine")


def test_lr_drop_waits_for_the_kd_loss_to_rise_above_the_threshold_and_come_back():
    """SPEC section 6 on a hand-made sequence of epoch means: the student starts as the teacher (KD loss far below
    1.0), ASL's shift lifts it above 1.0, and the lr drops at the end of the first epoch back at or below it."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    drop = LrDrop(opt, threshold=1.0, to_lr=1e-4)
    fired = [drop.step(epoch, kd) for epoch, kd in enumerate([0.004, 0.3, 1.0, 2.5, 1.7, 1.0, 0.5, 3.0, 0.2])]
    assert fired == [False] * 5 + [True] + [False] * 3      # not at epochs 0-2 (below, never above yet)
    assert drop.dropped_at == 5 and drop.lr == 1e-4 and drop.armed
    assert drop.state() == {"armed": True, "dropped_at": 5}


def test_lr_drop_armed_from_the_end_of_the_shift_phase():
    """ASD: armed from epoch 10 (its shift phase is epochs 0-9), whatever the loss did before; a loss above the
    threshold then still waits for its way back down."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    drop = LrDrop(opt, threshold=1.0, to_lr=1e-4, arm_epoch=10)
    fired = [drop.step(epoch, 0.17) for epoch in range(12)]     # the measured ASD run: 0.17-0.18, never above 1.0
    assert fired == [False] * 10 + [True, False] and drop.dropped_at == 10
    opt.param_groups[0]["lr"] = 1e-3
    late = LrDrop(opt, threshold=1.0, to_lr=1e-4, arm_epoch=10)
    fired = [late.step(epoch, kd) for epoch, kd in enumerate([0.1] * 9 + [1.5, 2.0, 1.2, 0.8])]
    assert fired == [False] * 12 + [True] and late.dropped_at == 12


def test_lr_drop_never_fires_when_the_loss_stays_below_or_when_off():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    kd_only = LrDrop(opt, threshold=1.0, to_lr=1e-4)           # plain KD: 0.3 at most
    assert not any(kd_only.step(e, kd) for e, kd in enumerate([0.3, 0.1, 0.05, 0.01]))
    assert kd_only.lr == 1e-3 and not kd_only.armed and kd_only.dropped_at is None
    off = LrDrop(opt, enabled=False)
    assert not off.step(0, 5.0) and not off.step(1, 0.1) and off.lr == 1e-3


def test_lr_drop_state_round_trip_and_old_last_pt():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    drop = LrDrop(opt)
    drop.step(0, 2.0)
    again = LrDrop(opt)
    again.restore(drop.state())
    assert again.step(1, 0.9) and again.dropped_at == 1      # the arming survived the resume
    old = LrDrop(opt)
    old.restore(None)                                          # an older last.pt kept only dropped_at
    assert (old.armed, old.dropped_at) == (False, None)
    old.restore(7)
    assert (old.armed, old.dropped_at) == (True, 7)


def test_step_lr_is_multisteplr():
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=0.4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [3, 5, 9], gamma=0.5)
    for epoch in range(12):
        assert step_lr(0.4, epoch, [3, 5, 9], 0.5) == pytest.approx(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert step_lr(1e-3, 149, [150, 300, 600], 0.5) == 1e-3 and step_lr(1e-3, 300, [150, 300, 600], 0.5) == 2.5e-4


def test_lr_drop_ignores_the_shift_phase_entirely():
    """Issue 29: with an arm epoch (ASD's end of the shift), an epoch above the threshold *during* the shift does
    not arm the drop, so a dip still inside the shift keeps the lr; the drop comes at the first epoch from the
    arm epoch on whose loss is at or below the threshold."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    drop = LrDrop(opt, threshold=1.0, to_lr=1e-4, arm_epoch=10)
    losses = [0.1, 2.0, 3.0, 0.5, 0.4, 1.5, 0.3, 0.2, 0.2, 0.2, 1.4, 0.9]   # above at 1, 2, 5; dips at 3 and 6
    fired = [drop.step(epoch, kd) for epoch, kd in enumerate(losses)]
    assert fired == [False] * 11 + [True] and drop.dropped_at == 11
    assert not any(LrDrop(opt, arm_epoch=10).step(e, kd) for e, kd in enumerate(losses[:10]))
