"""The perturbation searches of helper/train/perturb.py, on hand-made models whose answers can be written down."""
import math

import pytest
import torch

from helper.train.perturb import (
    MaskPattern,
    Universal,
    anomaly_index,
    ascent_step,
    flagged_classes,
    input_grad,
    minimal_trigger,
    project,
    sau_shared_loss,
    shared_adv_loss,
    shared_masks,
    shared_pgd,
    soft_kl,
    stamp,
)


def test_l2_projection_scales_onto_the_ball_and_leaves_the_inside():
    d = torch.zeros(2, 3, 2, 2)
    d[0, 0, 0, 0], d[0, 1, 1, 1] = 3.0, 4.0   # norm 5
    d[1, 2, 0, 1] = 1.0                        # norm 1
    p = project(d, 2.0)
    assert p[0].norm().item() == pytest.approx(2.0)
    assert p[0, 0, 0, 0].item() == pytest.approx(1.2) and p[0, 1, 1, 1].item() == pytest.approx(1.6)
    assert torch.equal(p[1], d[1])


def test_linf_projection_clips_each_pixel():
    d = torch.tensor([[-0.5, 0.1, 0.3]])
    assert torch.equal(project(d, 0.2, "linf"), torch.tensor([[-0.2, 0.1, 0.2]]))


def test_ascent_steps_in_each_geometry():
    d, g = torch.zeros(1, 2), torch.tensor([[3.0, -4.0]])
    assert torch.allclose(ascent_step(d, g, 1.0), torch.tensor([[0.6, -0.8]]))
    assert torch.allclose(ascent_step(d, g, 0.1, "linf"), torch.tensor([[0.1, -0.1]]))
    assert torch.equal(ascent_step(d, torch.zeros(1, 2), 1.0), d)  # a zero gradient does not move it
    with pytest.raises(ValueError):
        project(d, 1.0, "l1")


def test_ascent_on_a_linear_model_finds_its_worst_perturbation():
    """loss(x + delta) = w . (x + delta): the worst delta in the L2 ball of r is r w / ||w||, in the L-inf ball
    r sign(w); projected ascent reaches both (x = 0.5, r small: no pixel clips)."""
    torch.manual_seed(0)
    w = torch.randn(1, 3, 4, 4)
    x = torch.full((1, 3, 4, 4), 0.5)
    for norm, r, best in (("l2", 0.3, 0.3 * w / w.norm()), ("linf", 0.05, 0.05 * w.sign())):
        delta = torch.zeros_like(x)
        for _ in range(20):
            _, g = input_grad(lambda xp: (w * xp).sum(), x, delta)
            assert torch.allclose(g, w)
            delta = project(ascent_step(delta, g, r / 4, norm), r, norm)
        assert torch.allclose(delta, best, atol=1e-6)


def test_stamp_keeps_pixels_valid():
    x = torch.tensor([[0.1, 0.9]])
    assert torch.allclose(stamp(x, torch.tensor([[-0.5, 0.5]])), torch.tensor([[0.0, 1.0]]))


def test_soft_kl_by_hand():
    t = torch.tensor([[0.0, math.log(3.0)]])   # p = (1/4, 3/4)
    s = torch.zeros(1, 2)                       # q = (1/2, 1/2)
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert soft_kl(t, s).item() == pytest.approx(expected, rel=1e-5)
    assert soft_kl(t, t).item() == pytest.approx(0.0, abs=1e-7)


def one_hot_logits(labels, n=3, high=5.0):
    return torch.nn.functional.one_hot(torch.tensor(labels), n).float() * high


def test_shared_selection_on_constructed_logits():
    """Four samples, clean answers 0 for both models: (a) neither fooled, (b) only the model, (c) both fooled to
    different classes, (d) both fooled to class 2: only (d) is shared; (c) and (d) are common."""
    clean = torch.tensor([0, 0, 0, 0])
    m = shared_masks(one_hot_logits([0, 1, 1, 2]), one_hot_logits([0, 0, 2, 2]), clean, clean)
    assert m.fooled_model.tolist() == [False, True, True, True]
    assert m.fooled_ref.tolist() == [False, False, True, True]
    assert m.common.tolist() == [False, False, True, True]
    assert m.shared.tolist() == [False, False, False, True]


def test_shared_adv_loss_leaves_out_what_is_done():
    """Once every sample is shared and both models are fooled, nothing is left to push: the loss is 0."""
    clean = torch.tensor([0, 0])
    pert = one_hot_logits([2, 1])
    masks = shared_masks(pert, pert, clean, clean)
    assert masks.shared.all()
    assert shared_adv_loss(pert, pert, clean, masks).item() == pytest.approx(0.0, abs=1e-6)
    # one sample not fooled by either: -beta_1 * (CE_m + CE_r) / 2 / N, plus beta_2 * JS (0: identical outputs)
    pert = one_hot_logits([0, 1])
    masks = shared_masks(pert, pert, clean, clean)
    ce = torch.nn.functional.cross_entropy(pert[:1], clean[:1]).item()
    assert shared_adv_loss(pert, pert, clean, masks, beta_1=0.5).item() == pytest.approx(-0.5 * 2 * ce / 2 / 2, rel=1e-5)


def test_sau_shared_loss_by_hand():
    """p = 1/2 of the reference's perturbed class on the one fooled sample: (-log 1/2 - log 1/2) / 2 / N."""
    logits = torch.zeros(2, 2)
    loss = sau_shared_loss(logits, torch.tensor([1, 1]), torch.tensor([True, False]))
    assert loss.item() == pytest.approx(2 * math.log(2) / 2 / 2, rel=1e-4)
    assert sau_shared_loss(logits, torch.tensor([1, 1]), torch.tensor([False, False])).item() == 0.0


class Linear(torch.nn.Module):
    def __init__(self, w, b):
        super().__init__()
        self.w, self.b = w, b

    def forward(self, x):
        return x.flatten(1) @ self.w.T + self.b


def test_shared_pgd_finds_the_shared_class_within_its_ball():
    """Two linear models that both answer 0 on x and both move to class 1 along one direction u: PGD in the
    L-inf ball of 0.2 sends both there (shared), stays in the ball, and keeps the pixels valid."""
    torch.manual_seed(0)
    u = torch.randn(12).sign()
    w = torch.stack([torch.zeros(12), u, torch.zeros(12)])
    model, ref = Linear(w, torch.tensor([0.5, 0.0, 0.0])), Linear(1.5 * w, torch.tensor([0.5, 0.0, 0.0]))
    x = torch.full((4, 12), 0.5)
    labels = torch.zeros(4, dtype=torch.long)
    delta = shared_pgd(model, ref, x, labels, bound=0.2, step=0.2, steps=5)
    assert delta.abs().max() <= 0.2 + 1e-7
    assert torch.allclose(delta, 0.2 * u.expand(4, 12))
    xp = stamp(x, delta)
    assert (model(xp).argmax(1) == 1).all() and (ref(xp).argmax(1) == 1).all()


def test_anomaly_index_on_hand_made_norms():
    """median 10, |n - 10| = 0 1 1 2 2 0 8 -> MAD 1 x 1.4826: class 6 (norm 2) has index 8 / 1.4826 = 5.40 and is
    flagged; class 3 (12, index 1.35) is not, nor is a large outlier above the median (class 7)."""
    norms = [10, 11, 9, 12, 8, 10, 2]
    index, median, mad = anomaly_index(norms)
    assert median == 10 and mad == pytest.approx(1.4826)
    assert index[6].item() == pytest.approx(8 / 1.4826) and index[3].item() == pytest.approx(2 / 1.4826)
    assert flagged_classes(norms) == [6]
    assert flagged_classes(norms + [40]) == [6]  # median 10, MAD 1.5 x 1.4826: 40 is above the median
    assert flagged_classes([10, 10.5, 9.5, 10, 11, 9]) == []


def test_log_anomaly_index_on_hand_made_norms():
    """Sizes spread multiplicatively (the issue's faint ADBA teacher: 1.0 against 10-61): on the sizes the MAD
    index of the smallest stays under 2, on their logarithms it is far above.
    sizes 1, 10, 20, 30, 40, 60 -> median (lower middle) 20, |n - 20| = 19 10 0 10 20 40, MAD (lower middle) 10
    x 1.4826: index of 1 = 19 / 14.826 = 1.28. logs: median ln 20, |ln n - ln 20| = ln 20, ln 2, 0, ln 1.5, ln 2,
    ln 3 -> MAD ln 2 x 1.4826: index of 1 = ln 20 / (1.4826 ln 2) = 2.915."""
    import math
    sizes = [1, 10, 20, 30, 40, 60]
    index, median, _ = anomaly_index(sizes)
    assert median == 20 and index[0].item() == pytest.approx(19 / (10 * 1.4826))
    index, median, mad = anomaly_index(sizes, "log_mad")
    assert median == pytest.approx(math.log(20)) and mad == pytest.approx(1.4826 * math.log(2))
    assert index[0].item() == pytest.approx(math.log(20) / (1.4826 * math.log(2)))
    assert flagged_classes(sizes) == [] and flagged_classes(sizes, statistic="log_mad") == [0]
    scaled = anomaly_index([7 * v for v in sizes], "log_mad")[0]  # on logs the index does not depend on the unit
    assert torch.allclose(scaled, index)


def test_ratio_index_ignores_the_spread_that_fools_the_mad_index():
    """The median over each size. A clean-looking tight spread (40-55, the smallest 30: 1.5x smaller than the
    median) is flagged by the MAD index and not by the ratio; a wide spread with one size 7x below the median is
    flagged by the ratio (threshold 2.5) and not by the MAD index.
    tight: median (lower middle of ten) 45, |n - 45| = 15 5 3 2 0 1 3 6 8 10 -> MAD 3 x 1.4826, index of 30 = 3.37;
    ratio 45 / 30 = 1.5. wide: median 35, |n - 35| -> MAD 20 x 1.4826, index of 5 = 30 / 29.65 = 1.01; ratio 7."""
    tight = [30, 40, 42, 43, 45, 46, 48, 51, 53, 55]
    assert anomaly_index(tight)[0][0].item() == pytest.approx(15 / (3 * 1.4826))
    assert flagged_classes(tight) == [0] and flagged_classes(tight, statistic="ratio") == []
    assert anomaly_index(tight, "ratio")[0][0].item() == pytest.approx(45 / 30)
    wide = [5, 15, 20, 30, 35, 40, 60, 70, 90, 110]
    assert anomaly_index(wide)[0][0].item() == pytest.approx(30 / (1.4826 * 20))
    assert flagged_classes(wide) == [] and flagged_classes(wide, statistic="ratio") == [0]
    assert anomaly_index(wide, "ratio")[0].tolist() == pytest.approx([35 / v for v in wide])


def test_minimal_trigger_stops_once_the_smallest_trigger_stops_shrinking():
    """``stop``: a search whose goal is reached at once and whose size then cannot shrink (the cost is 0) ends
    after ``stop`` passes without a 1% gain; without ``stop`` it runs every pass; the trace has one row per pass."""
    class Always1(torch.nn.Module):
        def forward(self, x):
            return torch.stack([x.flatten(1).sum(1) * 0, torch.ones(len(x))], 1)
    x = torch.full((4, 1, 2, 2), 0.3)
    trace = []
    found = minimal_trigger(Always1(), x, 1, Universal(lr=0.02), passes=20, batch_size=4, success=1.0, init_cost=0.0,
                            stop=3, trace=trace)
    assert found.reached and found.passes == 4 and len(trace) == 4   # success at pass 1, then 3 stale passes
    assert all(rate == 1.0 and cost == 0.0 for rate, _, cost in trace)
    assert minimal_trigger(Always1(), x, 1, Universal(lr=0.02), passes=20, batch_size=4, success=1.0,
                           init_cost=0.0).passes == 20


def test_mask_family_stays_in_its_range():
    fam = MaskPattern(mask_max=0.3)
    params = [torch.full((1, 4, 4), 50.0), torch.full((3, 4, 4), -50.0)]
    m, p = fam.trigger(params)
    assert torch.allclose(m, torch.full_like(m, 0.3)) and torch.allclose(p, torch.zeros_like(p))
    assert fam.size(params).item() == pytest.approx(0.3 * 16)


def test_minimal_trigger_shrinks_to_what_the_class_needs():
    """A model that answers class 1 when pixel 0 is bright and class 0 otherwise: the smallest universal
    perturbation to class 1 moves pixel 0 only, by about what it takes; success is reached."""
    class Pixel(torch.nn.Module):
        def forward(self, x):
            v = x.flatten(1)[:, :1]
            return torch.cat([torch.zeros_like(v), 40 * (v - 0.6)], 1)
    x = torch.full((8, 1, 2, 2), 0.3)
    found = minimal_trigger(Pixel(), x, 1, Universal(lr=0.02), passes=150, batch_size=8, success=1.0)
    d = found.params[0]
    assert found.reached and found.success == 1.0
    assert 0.3 <= d.flatten()[0].item() <= 0.45
    assert d.flatten()[1:].abs().max().item() < 0.05
