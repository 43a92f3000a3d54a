import pytest
import torch

from helper.schedule import LrDrop, asd_ratio, loss_weights


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


def test_lr_drop_happens_once_at_the_threshold():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    drop = LrDrop(opt, threshold=1.0, to_lr=1e-4)
    assert not drop.step(0, 1.5) and drop.lr == 1e-3
    assert drop.step(1, 1.0) and drop.lr == 1e-4 and drop.dropped_at == 1
    assert not drop.step(2, 0.5) and drop.dropped_at == 1
    off = LrDrop(opt, enabled=False)
    opt.param_groups[0]["lr"] = 1e-3
    assert not off.step(0, 0.1) and off.lr == 1e-3
