"""The unlearning defenses (ibau, sau, nc): each runs end to end on a teacher folder written here, logs what its
perturbation does to the teacher and the student, and keeps to its own rules (the frozen teacher, the ball,
the share of stamped images)."""
import copy
import json

import pytest
import torch

import distri
from helper.defenses.ibau import self_retrospection_loss, universal_unlearning_loss
from helper.defenses.nc import stamp_share
from helper.train.perturb import MaskPattern, class_kl, soft_kl, stamp
from tests.conftest import fast_flags, write_teacher_dir

SMALL_NC = ["--nc_images", "32", "--nc_passes", "2", "--nc_batch", "32"]


def rows(folder):
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("defense,extra", [("ibau", []), ("ibau", ["--adv_search", "teacher", "--adv_steps", "2"]),
                                           ("sau", ["--adv_steps", "2"]), ("nc", SMALL_NC)])
def test_defense_runs_two_epochs_and_logs_its_perturbation(tmp_path, defense, extra):
    teacher = write_teacher_dir(tmp_path / "teacher")
    before = torch.load(f"{teacher}/checkpoint.pkl", weights_only=True)[0]
    out = tmp_path / "run"
    results = distri.main(fast_flags(teacher, out) + ["--defense", defense, *extra])
    assert results["defense"] == defense and len(rows(out)) == 2
    assert 0 <= results["acc"] <= 1 and (out / "selected.pkl").is_file()
    after = torch.load(f"{teacher}/checkpoint.pkl", weights_only=True)[0]
    assert all(torch.equal(before[k], after[k]) for k in before)  # the teacher folder is untouched
    diag = rows(out)[-1]["diag"]
    if defense == "nc":
        nc = results["nc"]
        assert len(nc["mask_l1"]) == len(nc["anomaly_index"]) == 10
        assert nc["unlearned_class"] == (nc["flagged"][0] if nc["flagged"] else None)
        return
    for model in ("teacher", "student"):
        assert set(diag["adv"][model]) == {"flip", "top", "top_share"}
    if defense == "ibau":
        assert 0 < diag["adv"]["delta_l2"] <= 3.0 + 1e-4  # from a small random start, inside the ball
        assert "unlearn" in rows(out)[-1]
    else:
        assert 0 <= diag["adv"]["shared"] <= diag["adv"]["common"] <= 1


def test_args_record_each_defense_defaults(tmp_path):
    """The defaults of their public code where they carry over (helper/defenses/*.py): SAU's Adam 1e-4, batch
    256, L-inf 0.2 in 5 steps of 0.2; I-BAU with an L2 ball."""
    teacher = write_teacher_dir(tmp_path / "teacher")
    args = distri.defense_parser(["--defense", "sau"]).parse_args(["--defense", "sau"])
    assert (args.opt_type, args.opt_lr, args.batch_size, args.sau_radius, args.adv_steps, args.sau_lr) == \
        ("Adam", 1e-4, 256, 0.2, 5, 0.2)
    args = distri.defense_parser(["--defense", "ibau"]).parse_args(["--defense", "ibau"])
    assert (args.adv_search, args.ibau_radius, args.adv_steps, args.opt_lr) == ("student", 3.0, 1, 0.01)
    assert teacher  # the folder fixture is not needed beyond parsing


def test_each_unlearning_defense_has_its_own_radius_and_the_old_flag_still_parses(tmp_path):
    """``--adv_radius`` was an L2 radius for ibau and an L-infinity one for sau: now ``--ibau_radius`` and
    ``--sau_radius`` (and ``--ibau_lr``, ``--sau_lr``), the old names kept as aliases of each."""
    teacher = write_teacher_dir(tmp_path / "teacher")
    for name, own in (("ibau", "ibau"), ("sau", "sau")):
        old = distri.defense_parser(["--defense", name]).parse_args(["--defense", name, "--adv_radius", "0.5",
                                                                     "--adv_lr", "0.25"])
        new = distri.defense_parser(["--defense", name]).parse_args(["--defense", name, f"--{own}_radius", "0.5",
                                                                     f"--{own}_lr", "0.25"])
        assert vars(old) == vars(new) and getattr(new, f"{own}_radius") == 0.5 and getattr(new, f"{own}_lr") == 0.25
        assert not hasattr(new, "adv_radius") and not hasattr(new, "adv_lr")
    assert teacher  # the folder fixture is not needed beyond parsing


def test_bad_budget_is_one_line(tmp_path, capsys):
    teacher = write_teacher_dir(tmp_path / "teacher")
    with pytest.raises(SystemExit) as e:
        distri.main(fast_flags(teacher, tmp_path / "run") + ["--defense", "ibau", "--adv_radius", "0"])
    assert e.value.code == 2 and "--adv_radius" in capsys.readouterr().err


def test_unlearning_losses_by_hand():
    t = torch.tensor([[0.0, 0.0]])
    s = torch.tensor([[0.0, torch.log(torch.tensor(3.0))]])
    kd = torch.tensor(0.5)
    expected = 0.5 + 2 * soft_kl(t, s).item()
    loss, term = universal_unlearning_loss(kd, s, t, 2.0)
    assert loss.item() == pytest.approx(expected) and term.item() == pytest.approx(soft_kl(t, s).item())
    # ABD's unlearn.py: its KLDiv(T)(t(x + delta), t(x)) = T^2 KL(softmax(t(x)/T) || softmax(t(x + delta)/T))
    t_clean, t_pert = torch.tensor([[3.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 0.5]])
    for temp in (1.0, 8.0):
        p = torch.softmax(t_clean / temp, 1)
        q = torch.softmax(t_pert / temp, 1)
        by_hand = temp ** 2 * (p * (p.log() - q.log())).sum().item()
        assert self_retrospection_loss(t_pert, t_clean, temp).item() == pytest.approx(by_hand, rel=1e-5)
    # the other direction (this package before issue 29): KL(t(x + delta) || t(x)) = 1.2043 here, not 0.9051
    assert self_retrospection_loss(t_pert, t_clean, 1.0).item() == pytest.approx(0.9051, abs=1e-4)
    assert soft_kl(t_pert, t_clean).item() == pytest.approx(1.2043, abs=1e-4)


def test_the_target_term_is_the_binary_kl_of_the_target_class_by_hand():
    # teacher p = (0.5, 0.25, 0.25), student q = (0.25, 0.25, 0.5): for class 0
    # 0.5 log(0.5 / 0.25) + 0.5 log(0.5 / 0.75) = 0.5 log 2 + 0.5 log(2 / 3) = 0.5 log(4 / 3)
    t = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    s = torch.log(torch.tensor([[0.25, 0.25, 0.5]]))
    assert class_kl(t, s, 0).item() == pytest.approx(0.5 * torch.log(torch.tensor(4 / 3)).item(), rel=1e-5)
    # class 1 has the same probability in both: no term, whatever the others do (the full KL is not zero)
    assert class_kl(t, s, 1).item() == pytest.approx(0.0, abs=1e-7) and soft_kl(t, s).item() > 0.1
    # its gradient moves the logits only along (class c) against (the rest), the rest in proportion to q
    s = s.clone().requires_grad_(True)
    class_kl(t, s, 0).backward()
    g, q = s.grad[0], torch.tensor([0.25, 0.25, 0.5])
    assert g.sum().item() == pytest.approx(0.0, abs=1e-6) and g[0] < 0  # q_0 < p_0: class 0 pushed up
    assert (g[2] / g[1]).item() == pytest.approx((q[2] / q[1]).item(), rel=1e-5)
    loss, term = universal_unlearning_loss(torch.tensor(0.5), s.detach(), t, 2.0, target=0)
    assert term.item() == pytest.approx(class_kl(t, s, 0).item()) and loss.item() == pytest.approx(0.5 + 2 * term.item())


def test_stamp_share_stamps_the_first_part_of_the_batch():
    fam = MaskPattern()
    params = [torch.full((1, 2, 2), 50.0), torch.full((3, 2, 2), 50.0)]  # mask 1, pattern white
    x = torch.zeros(10, 3, 2, 2)
    y = stamp_share(x, 0.2, fam, params)
    assert torch.allclose(y[:2], torch.ones(2, 3, 2, 2)) and torch.equal(y[2:], x[2:])
    assert torch.equal(stamp_share(x, 0.2, fam, None), x)   # nothing flagged: plain KD


def test_fused_ascent_moves_delta_along_the_students_gradient(tmp_path):
    """With --adv_search student the student's own backward gives delta's step: after one step delta has moved
    (its direction is no longer the random start) and it stays on or inside the ball."""
    from helper.defenses.ibau import IBAU
    from models import resnet18
    args = distri.defense_parser(["--defense", "ibau"]).parse_args(["--defense", "ibau", "--adv_radius", "1.0"])
    torch.manual_seed(0)
    teacher, student = resnet18(10, 4), resnet18(10, 4)
    d = IBAU(args, teacher, torch.device("cpu"), None, 8)
    step = d.stages(student)[0].step
    start = d.delta.clone()
    named = step(torch.rand(8, 3, 32, 32))
    assert set(named) == {"kd_loss", "unlearn"}
    assert not torch.allclose(d.delta, start) and d.delta.norm().item() <= 1.0 + 1e-5
    assert all(p.grad is None for p in teacher.parameters())


def _ibau(flags, width=4):
    from helper.defenses.ibau import IBAU
    from models import resnet18
    args = distri.defense_parser(["--defense", "ibau"]).parse_args(["--defense", "ibau", *flags])
    torch.manual_seed(0)
    teacher, student = resnet18(10, width), resnet18(10, width)
    d = IBAU(args, teacher, torch.device("cpu"), None, 8)
    return d, d.stages(student)[0], teacher, student


def test_adv_term_target_puts_the_target_classes_term_in_the_step(monkeypatch):
    import helper.defenses.ibau as ibau
    seen = []
    real = ibau.class_kl
    monkeypatch.setattr(ibau, "class_kl", lambda t, s, c: seen.append(c) or real(t, s, c))
    x = torch.rand(16, 3, 32, 32)
    _, stage, teacher, student = _ibau(["--adv_search", "teacher", "--adv_target", "3", "--adv_term", "target",
                                        "--adv_init", "1"])
    out = stage.step(x)
    assert seen == [3]
    with torch.no_grad():  # the logged term is the class term of the student's answer on x + delta
        assert out["unlearn"].item() >= 0
    _, stage_full, _, _ = _ibau(["--adv_search", "teacher", "--adv_target", "3", "--adv_init", "1"])
    stage_full.step(x)
    assert seen == [3]  # the default, full, does not call it


def _bn_stats(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k}


@pytest.mark.parametrize("mode", ["eval", "batch"])
def test_perturbed_pass_leaves_the_running_statistics_to_the_clean_images(mode):
    """Issue 29: the student's running batch-norm statistics after a step are those of a train-mode forward of
    the clean batch alone (the perturbed images, up to --adv_radius away, do not enter them); with --adv_bn
    shared (the earlier behaviour) they do."""
    x = torch.rand(16, 3, 32, 32)
    d, stage, _, student = _ibau(["--adv_bn", mode, "--adv_radius", "3", "--adv_init", "1"])
    reference = copy.deepcopy(student).train()
    with torch.no_grad():
        reference(x)
    student.train()
    stage.step(x)
    got, want = _bn_stats(student), _bn_stats(reference)
    assert all(torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-6) for k in want)
    d2, stage2, _, student2 = _ibau(["--adv_bn", "shared", "--adv_radius", "3", "--adv_init", "1"])
    student2.train()
    stage2.step(x)
    shared = _bn_stats(student2)
    assert not all(torch.allclose(shared[k], want[k], rtol=1e-5, atol=1e-6) for k in want)


@pytest.mark.parametrize("mode", ["eval", "batch"])
def test_every_ascent_step_sees_the_same_student(mode):
    """The fused ascent step (from the student's own backward) moves delta exactly as a separate ascent step on
    the same model state would: beta * d D / d delta with the student's batch-norm as --adv_bn says, after the
    clean batch's forward and before the weights move (an eval-mode backward reads the running statistics, so the
    clean forward that updates them must come first)."""
    from helper.defenses.ibau import PERTURBED_BN
    from helper.train.perturb import ascent_step, input_grad, project
    x = torch.rand(16, 3, 32, 32)
    d, stage, teacher, student = _ibau(["--adv_bn", mode, "--adv_init", "1", "--adv_lr", "0.3"])
    with torch.no_grad():  # move the student off the teacher first, so D has a gradient at delta
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    student.train()
    start = d.delta.clone()
    with torch.no_grad():
        t = teacher.eval()(x)
    probe = copy.deepcopy(student)
    with torch.no_grad():
        probe(x)  # the step's clean train-mode forward comes first and updates the running statistics
    with PERTURBED_BN[mode](probe):
        _, g = input_grad(lambda xp: soft_kl(t, probe(xp)), x, start)
    stage.step(x)
    expected = project(ascent_step(start, g, 0.3), 3.0)
    assert torch.allclose(d.delta, expected, rtol=1e-4, atol=1e-5)  # two backward paths: summation order differs


def test_freeze_bn_always_trains_the_student_in_eval_mode_with_its_gradient_clipped(monkeypatch):
    """``--freeze_bn always``: every forward of the student in the step (clean, perturbed, the targeted climb and
    the mask trigger's) runs in eval mode, the running statistics stay as they were, the student is back in train
    mode after the step; ``--clip_grad`` reaches the optimisation step."""
    import helper.defenses.ibau as ibau
    clips = []
    real = ibau.optimizer_step
    monkeypatch.setattr(ibau, "optimizer_step", lambda opt, loss, clip=0.0: clips.append(clip) or real(opt, loss, clip))
    x = torch.rand(16, 3, 32, 32)
    d, stage, _, student = _ibau(["--freeze_bn", "always", "--clip_grad", "0.5", "--adv_search", "student",
                                  "--adv_target", "2", "--adv_init", "1"])
    modes = []
    student.register_forward_hook(lambda m, i, o: modes.append(m.training))
    before = _bn_stats(student)
    student.train()
    stage.step(x)
    assert modes and not any(modes) and student.training and clips == [0.5]
    assert all(torch.equal(before[k], v) for k, v in _bn_stats(student).items())
    d2, stage2, _, student2 = _ibau(["--adv_search", "student", "--adv_target", "2", "--adv_init", "1"])
    modes2 = []
    student2.register_forward_hook(lambda m, i, o: modes2.append(m.training))
    student2.train()
    stage2.step(x)
    assert all(modes2) and clips[-1] == 0.0  # the default: train mode, no clipping


def test_frozen_bn_stats_normalises_by_the_batch_and_restores_everything():
    from helper.defenses.ibau import frozen_bn_stats
    bn = torch.nn.BatchNorm2d(3).eval()
    before = _bn_stats(bn)
    x = torch.randn(8, 3, 4, 4) * 5 + 2
    with frozen_bn_stats(bn):
        y = bn(x)
        assert bn.training
    assert not bn.training and bn.momentum == 0.1
    assert all(torch.equal(before[k], v) for k, v in _bn_stats(bn).items())
    mean, var = x.mean((0, 2, 3), keepdim=True), x.var((0, 2, 3), unbiased=False, keepdim=True)
    assert torch.allclose(y, (x - mean) / (var + bn.eps).sqrt(), atol=1e-5)


def test_delta_starts_small_by_default_and_on_the_sphere_with_init_1():
    d, *_ = _ibau([])
    assert d.delta.norm().item() == pytest.approx(0.01 * 3.0, rel=1e-4)
    d, *_ = _ibau(["--adv_init", "1", "--adv_radius", "2"])
    assert d.delta.norm().item() == pytest.approx(2.0, rel=1e-4)


def test_teacher_search_starting_near_zero_finds_a_direction():
    """At delta = 0 the teacher's divergence from itself has no gradient; from the small start it climbs off."""
    d, stage, *_ = _ibau(["--adv_search", "teacher", "--adv_steps", "3", "--adv_lr", "0.5"])
    stage.step(torch.rand(16, 3, 32, 32))
    assert 1.0 < d.delta.norm().item() <= 1.5 + 0.03 + 1e-5  # three steps of 0.5 from 0.03, not all aligned


class _Planted(torch.nn.Module):
    """A tiny 10-class model with a planted shortcut: moving an image along ``p`` raises class 0 (gain 20), along
    ``q`` class 3 (gain 80, the steeper direction, an ordinary adversarial one). Linear, so every search is exact."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.num_classes = 10
        self.lin = torch.nn.Linear(3072, 10)
        with torch.no_grad():
            self.lin.weight.mul_(0.01)
        basis = torch.linalg.qr(torch.randn(3072, 2, generator=g))[0]
        self.register_buffer("p", basis[:, 0])
        self.register_buffer("q", basis[:, 1])

    def forward(self, x):
        f = x.flatten(1)
        z = self.lin(f)
        return z + torch.outer(20 * (f @ self.p), torch.eye(10)[0]) + torch.outer(80 * (f @ self.q), torch.eye(10)[3])


def test_a_targeted_search_finds_the_planted_class_where_the_untargeted_one_does_not():
    """Issue 30 item 1: with --adv_target 0 delta climbs the teacher's log p(0 | x + delta) and sends the images to
    the planted class; the untargeted divergence climbs the steeper ordinary direction (class 3) instead."""
    from helper.defenses.ibau import IBAU
    x = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    shares = {}
    for name, flags in (("targeted", ["--adv_target", "0"]), ("untargeted", [])):
        args = distri.defense_parser(["--defense", "ibau"]).parse_args(
            ["--defense", "ibau", "--adv_search", "teacher", "--adv_radius", "3", "--adv_lr", "0.5", *flags])
        torch.manual_seed(0)
        teacher = _Planted()
        d = IBAU(args, teacher, torch.device("cpu"), None, 64)
        stage = d.stages(copy.deepcopy(teacher).requires_grad_(True))[0]
        for _ in range(8):
            stage.step(x)
        with torch.no_grad():
            answers = teacher(stamp(x, d.delta)).argmax(1)
        shares[name] = {c: (answers == c).float().mean().item() for c in (0, 3)}
        assert d.delta.norm().item() <= 3.0 + 1e-4
    assert shares["targeted"][0] > 0.9 and shares["untargeted"][0] < 0.2
    assert shares["untargeted"][3] > 0.9


def test_adv_target_outside_the_classes_is_one_line(tmp_path, capsys):
    teacher = write_teacher_dir(tmp_path / "teacher")
    with pytest.raises(SystemExit) as e:
        distri.main(fast_flags(teacher, tmp_path / "run") + ["--defense", "ibau", "--adv_target", "10"])
    assert e.value.code == 2 and "--adv_target 10" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_ibau_starts_from_the_scans_inverted_trigger(tmp_path, capsys):
    """``--adv_start SCAN_DIR``: delta starts at the scan's universal trigger of ``--adv_target``'s class, projected
    to the ball (an inverted delta of L2 5 on a ball of 3 starts as that delta x 3/5); an ascent step of 1e-9 per
    batch leaves it there for the check. Without ``--adv_target`` or with no inverted.pt: one line, no folder."""
    teacher = write_teacher_dir(tmp_path / "teacher")
    scan_dir = tmp_path / "scan"
    scan_dir.mkdir()
    deltas = [torch.randn(3, 32, 32) for _ in range(10)]
    deltas[4] = deltas[4] * 5 / deltas[4].norm()
    torch.save({"universal": [[d] for d in deltas], "mask": []}, scan_dir / "inverted.pt")
    out = tmp_path / "run"
    distri.main(fast_flags(teacher, out, epochs=1) + ["--defense", "ibau", "--adv_search", "teacher", "--adv_target", "4",
                                                      "--adv_start", str(scan_dir), "--adv_lr", "1e-9"])
    delta = torch.load(out / "last.pt", weights_only=True)["defense"]["delta"]
    assert torch.allclose(delta.flatten(), (deltas[4] * 3 / 5).flatten(), atol=1e-6)
    for extra, said in ((["--adv_start", str(scan_dir)], "--adv_start needs --adv_target"),
                        (["--adv_start", str(tmp_path), "--adv_target", "4"], "inverted triggers file not found")):
        with pytest.raises(SystemExit) as e:
            distri.main(fast_flags(teacher, tmp_path / "refused", epochs=1) + ["--defense", "ibau", *extra])
        assert e.value.code == 2 and said in capsys.readouterr().err
        assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize("every,climbs", [(1, 4), (3, 2)])
def test_ibau_climbs_on_every_nth_step_only(tmp_path, monkeypatch, every, climbs):
    """Two epochs of two steps (128 images, batch 64): with ``--adv_every 3`` delta climbs at steps 0 and 3 only;
    the count of steps is part of the resumable state."""
    import helper.defenses.ibau as ibau
    calls = []
    real = ibau.input_grad
    monkeypatch.setattr(ibau, "input_grad", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    teacher = write_teacher_dir(tmp_path / "teacher")
    out = tmp_path / "run"
    distri.main(fast_flags(teacher, out) + ["--defense", "ibau", "--adv_search", "teacher", "--adv_every", str(every)])
    assert len(calls) == climbs
    assert torch.load(out / "last.pt", weights_only=True)["defense"]["steps"] == 4


def test_ibau_inverts_the_mask_trigger_on_the_teacher_then_on_the_student_every_n_epochs(tmp_path, monkeypatch):
    """``--adv_mask_every 2`` over 4 epochs: the mask-and-pattern trigger of --adv_target is inverted on the teacher
    before training and on the student at epoch 2 (warm-started from the first), a fifth of each clean batch carries
    it (the student's KD input, not the teacher's), and its parameters are in last.pt."""
    import helper.defenses.ibau as ibau
    inversions, stamped = [], []
    real_invert, real_stamp = ibau.minimal_trigger, ibau.stamp_share

    def invert(model, images, target, family, **kw):
        found = real_invert(model, images, target, family, **kw)
        inversions.append((target, kw["params"] is not None, len(images)))
        return found
    monkeypatch.setattr(ibau, "minimal_trigger", invert)
    monkeypatch.setattr(ibau, "stamp_share", lambda x, share, *a: stamped.append((len(x), share)) or real_stamp(x, share, *a))
    teacher = write_teacher_dir(tmp_path / "teacher")
    out = tmp_path / "run"
    distri.main(fast_flags(teacher, out, epochs=4) + ["--defense", "ibau", "--adv_search", "teacher", "--adv_target", "3",
                                                      "--adv_mask_every", "2"])
    assert inversions == [(3, False, 100), (3, True, 100)]  # the first 100 of the 128 defense images (SCAN_IMAGES)
    assert stamped == [(64, 0.2)] * 8  # 4 epochs of 2 batches of 64
    mask = torch.load(out / "last.pt", weights_only=True)["defense"]["mask"]
    assert [tuple(p.shape) for p in mask] == [(1, 32, 32), (3, 32, 32)]


@pytest.mark.parametrize("extra,said", [
    (["--defense", "sau", "--adv_radius", "2"], "--sau_radius (also --adv_radius) must be in (0, 1], not 2.0"),
    (["--defense", "nc", "--nc_share", "1.5"] + SMALL_NC, "--nc_share must be in [0, 1], not 1.5"),
    (["--defense", "nc", "--nc_images", "0"], "--nc_images must be >= 1, not 0"),
    (["--defense", "auto", "--nc_threshold", "0.5"], "--nc_threshold must be above 1"),
    (["--defense", "ibau", "--adv_beta", "-1"], "--adv_beta must be >= 0, not -1.0"),
    (["--defense", "ibau", "--adv_start", "somewhere"], "--adv_start needs --adv_target"),
    (["--defense", "ibau", "--adv_mask_every", "2"], "--adv_mask_every needs --adv_target"),
    (["--defense", "ibau", "--freeze_bn", "always", "--adv_bn", "shared"], "--freeze_bn always keeps the running"),
    (["--defense", "ibau", "--clip_grad", "-1"], "--clip_grad must be >= 0, not -1.0"),
    (["--defense", "ibau", "--adv_term", "target"], "--adv_term target needs --adv_target"),
    (["--defense", "ibau", "--adv_target", "0", "--adv_mask_every", "1", "--adv_mask_share", "2"],
     "--adv_mask_share must be in [0, 1], not 2.0"),
    (["--defense", "renofeation", "--reno_swa_start", "1.5"], "--reno_swa_start must be a fraction in [0, 1) or a whole"),
    (["--defense", "nad", "--nad_betas", "1", "2"], "--nad_betas has 2 values for 3 --nad_layers"),
    (["--defense", "bcu", "--bcu_ratios", "0", "0", "0", "0", "1.5", "0"], "--bcu_ratios must be in [0, 1], not 1.5"),
    (["--defense", "fineprune", "--fp_step", "0"], "--fp_step must be in (0, 1], not 0.0"),
    (["--defense", "asd", "--eps", "0"], "--eps must be in (0, 1], not 0.0"),
])
def test_out_of_range_unlearning_flags_are_refused_in_one_line(tmp_path, capsys, extra, said):
    teacher = write_teacher_dir(tmp_path / "teacher")
    with pytest.raises(SystemExit) as e:
        distri.main(fast_flags(teacher, tmp_path / "run", epochs=1) + extra)
    err = capsys.readouterr().err
    assert e.value.code == 2 and said in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
