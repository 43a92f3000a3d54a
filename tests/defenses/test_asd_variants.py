"""The ASD variants of the study (docs/asd-study.md): their mechanics on hand-made tensors,
and every arm of the study preset end to end on synthetic data."""
import copy
import os

import pytest
import torch

import distri
from helper.defenses.asd import Distiller
from helper.jobs.grid import PRESETS, arm
from helper.run.runlog import read_jsonl
from helper.train.diagnostics import asl_states, channel_activity, dead_units, least_active, unit_bns
from helper.train.engine import optimizer_step
from helper.train.schedule import asd_ratio, loss_weights
from models import resnet18
from tests import read_json
from tests.conftest import fast_flags

torch.manual_seed(0)


def test_schedule_moves_with_shift_epochs_and_keeps_a_kd_floor():
    assert [asd_ratio(e) for e in (0, 9, 10, 19, 30, 40)] == [0, 0, 0.9, 0.9, pytest.approx(0.95), 1.0]
    assert [asd_ratio(e, shift_epochs=3) for e in (2, 3, 12, 13, 23, 33)] == [0, 0.9, 0.9, 0.9, pytest.approx(0.95), 1]
    assert asd_ratio(0, shift_epochs=0) == 0.9  # no ASL-only phase
    assert asd_ratio(5, floor=0.9) == 0.9 and asd_ratio(15, floor=0.95) == 0.95 and asd_ratio(45, floor=0.5) == 1.0
    # x10 before shift_epochs + 10, x20 after; asl_scale scales ASL's weight only
    assert loss_weights(12, "scheduler", shift_epochs=3) == (9.0, pytest.approx(1.0))
    assert loss_weights(13, "scheduler", shift_epochs=3) == (pytest.approx(18.0), pytest.approx(2.0))
    assert loss_weights(5, "scheduler", floor=0.9, asl_scale=0.5) == (9.0, pytest.approx(0.5))
    assert loss_weights(0, "fix", 1.0, 2.0, asl_scale=0.25) == (1.0, 0.5)


def _conv_bn(width=4):
    """A stem and one block-like pair, named as the ResNet's: what the activity functions look up."""
    m = torch.nn.Module()
    m.conv1 = torch.nn.Conv2d(1, width, 1, bias=False)
    m.bn1 = torch.nn.BatchNorm2d(width)
    m.forward = lambda x: torch.relu(m.bn1(m.conv1(x)))
    return m


def test_least_active_channels_are_the_ones_clean_data_leaves_off():
    m = _conv_bn(5).eval()
    with torch.no_grad():  # channel c outputs (c - 2) * pixel, bn the identity: channels 0 and 1 negative, 2 zero
        m.conv1.weight.copy_(torch.arange(5.0).sub(2).view(5, 1, 1, 1))
    images = torch.full((6, 1, 2, 2), 255, dtype=torch.uint8)  # to_float: all ones
    activity = channel_activity(m, images, ["conv1"], batch_size=4)["conv1"]
    eps = m.bn1.eps
    assert activity.tolist() == pytest.approx([0, 0, 0, 1 / (1 + eps) ** 0.5, 2 / (1 + eps) ** 0.5])
    assert least_active({"conv1": activity}, 0.4)["conv1"].tolist() == [0, 1]       # ceil(0.4 x 5) = 2, ties: lower index
    assert least_active({"conv1": activity}, 0.1)["conv1"].tolist() == [0]          # at least one
    assert least_active({"conv1": torch.tensor([3.0, 1, 2] * 10)}, 0.1)["conv1"].tolist() == [1, 4, 7]  # 0.1 x 30 = 3
    assert m.training is False


def test_a_dormant_shift_touches_only_the_chosen_channels():
    teacher, student = resnet18(10, 4).eval(), resnet18(10, 4)
    student.load_state_dict(teacher.state_dict())
    student.eval()  # the teacher's batch-norm statistics: the same features
    x = torch.rand(4, 3, 32, 32)
    channels = {"layer4.1.conv1": torch.tensor([1, 3])}
    d = Distiller(teacher, student, torch.optim.SGD(student.parameters(), lr=0.1), list(channels), channels=channels)
    kd, asl = d.losses(x)
    asl.backward()
    g = student.layer4[1].conv1.weight.grad
    assert g[[1, 3]].abs().sum() > 0 and g[[0, 2]].abs().sum() == 0  # the hooked layer's unchosen channels: no push
    assert student.layer4[0].conv1.weight.grad.abs().sum() > 0     # what feeds the chosen channels still moves
    assert asl.item() == pytest.approx(4.0)  # the student is the teacher: every sign agrees, 4 per element
    d.close()
    # two layers: the mean over the layers of ASL on the chosen channels alone
    student.layer4[1].conv1.weight.data.neg_()
    channels = {"layer1.0.conv1": torch.tensor([0, 2]), "layer4.1.conv1": torch.tensor([1])}
    d = Distiller(teacher, student, torch.optim.SGD(student.parameters(), lr=0.1), list(channels), channels=channels)
    _, asl = d.losses(x)
    assert asl.item() == pytest.approx((4.0 + 0.0) / 2)  # layer1.0 agrees everywhere, layer4.1 nowhere
    d.close()


def test_a_local_shift_moves_the_hooked_convolution_and_nothing_before_it():
    teacher, student = resnet18(10, 4).eval(), resnet18(10, 4)
    student.load_state_dict(teacher.state_dict())
    student.eval()
    channels = {"layer4.1.conv1": torch.tensor([1, 3])}
    x = torch.rand(4, 3, 32, 32)
    d = Distiller(teacher, student, torch.optim.SGD(student.parameters(), lr=0.1), list(channels), channels=channels,
                  local=True)
    _, asl = d.losses(x)
    assert asl.item() == pytest.approx(4.0)  # the same values as the hooked output
    asl.backward()
    g = student.layer4[1].conv1.weight.grad
    assert g[[1, 3]].abs().sum() > 0 and g[[0, 2]].abs().sum() == 0
    assert all(p.grad is None for n, p in student.named_parameters() if not n.startswith("layer4.1.conv1"))
    d.close()
    from helper.run.errors import UserError
    with pytest.raises(UserError, match="local shift .* needs convolution layers; layer1.0.bn1 is not"):
        Distiller(teacher, student, None, ["layer1.0.bn1"], local=True)


def test_clip_grad_caps_the_step():
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    opt = torch.optim.SGD([w], lr=1.0)
    optimizer_step(opt, (w * torch.tensor([30.0, 40.0])).sum(), clip_norm=5.0)  # gradient (30, 40), norm 50 -> 5
    assert w.detach().tolist() == pytest.approx([0.0, 0.0], abs=1e-5)  # torch divides by norm + 1e-6
    optimizer_step(opt, (w * torch.tensor([0.3, 0.4])).sum(), clip_norm=5.0)    # norm 0.5 < 5: unchanged
    assert w.detach().tolist() == pytest.approx([-0.3, -0.4], abs=1e-5)


def test_dead_units_and_asl_states_by_hand():
    model = resnet18(10, 4).eval()
    x = torch.rand(2, 3, 32, 32)
    before = dead_units(model, x)
    with torch.no_grad():
        model.bn1.bias[:2] = -1e6  # two of the stem's 4 channels can never pass the ReLU
        model.layer1[0].bn1.bias[:] = -1e6
    dead = dead_units(model, x)
    assert dead["stem"] == 0.5 and dead["layer1.0"] == 1.0 and before["stem"] == before["layer1.0"] == 0.0
    assert list(dead) == ["stem"] + [f"layer{i}.{j}" for i in range(1, 5) for j in (0, 1)] == list(unit_bns(model))
    t = torch.tensor([1.0, 1.0, -1.0, 0.0, 2.0, -3.0, 0.5, -0.5])
    s = torch.tensor([2.0, -1.0, -1.0, 0.0, 1.0, 1.0, 0.5, 0.2])
    assert asl_states(t, s) == {"aa": 3 / 8, "dd": 2 / 8, "ad": 1 / 8, "da": 2 / 8}


def test_freeze_bn_keeps_running_statistics_during_the_shift_only(teacher_dir, tmp_path):
    """With --freeze_bn shift the student's running statistics do not move in the lambda = 0 epochs and do after."""
    def stats(folder):
        return torch.load(os.path.join(folder, "checkpoint.pkl"), weights_only=True)[0]["bn1.running_mean"]
    from helper.data.teacher_dir import load_model
    start = load_model(os.path.join(teacher_dir, "checkpoint.pkl")).state_dict()["bn1.running_mean"]
    for epochs, moved in ((1, False), (2, True)):
        out = tmp_path / f"e{epochs}"
        distri.main(fast_flags(teacher_dir, out, epochs=epochs) + ["--no_progress", "--freeze_bn", "shift",
                                                                     "--shift_epochs", "1"])
        assert (not torch.equal(stats(out), start)) == moved


def test_every_arm_of_the_study_runs_and_logs_its_diagnostics(teacher_dir, tmp_path):
    arms = [arm(c) for c in PRESETS["study"]["cells"]]
    assert {label for label, *_ in arms} >= {"kd", "asd", "bcu", "asd-first", "asd-bn", "asd-dormant", "kd-scratch"}
    for label, defense, _, flags in arms:
        if defense not in ("asd", "kd"):
            continue
        out = tmp_path / label
        shift = ["--shift_epochs", "1"] if defense == "asd" else []  # KD takes none of ASD's flags
        results = distri.main(fast_flags(teacher_dir, out, epochs=2) + ["--no_progress", "--defense", defense,
                                                                         *shift, *flags])
        rows = read_jsonl(os.path.join(out, "log.jsonl"))
        diag = rows[-1]["diag"]
        assert set(diag["dead"]) == {"stem"} | {f"layer{i}.{j}" for i in range(1, 5) for j in (0, 1)}
        assert sum(diag["asl_states"].values()) == pytest.approx(1.0)
        assert diag["grad_kd"] >= 0 and diag["grad_asl"] > 0 and "asl_probe" in diag
        if label == "asd-dormant":  # ceil(10%) of 4, 4, 8, 8, 16, 16, 32, 32 channels per hooked layer, recorded
            chosen = results["shifted_channels"]
            assert [len(c) for c in chosen.values()] == [1, 1, 1, 1, 2, 2, 4, 4]
        args = read_json(os.path.join(out, "args.json"))
        assert args["defense"] == defense


def test_the_diagnostics_table_of_a_run(teacher_dir, tmp_path, capsys):
    from helper.report import diagnostics
    out = tmp_path / "run"
    distri.main(fast_flags(teacher_dir, out, epochs=2) + ["--no_progress", "--shift_epochs", "1"])
    rows = read_jsonl(os.path.join(out, "log.jsonl"))
    capsys.readouterr()
    s = diagnostics.summary_row(rows[1])
    d = rows[1]["diag"]
    assert s["dead_stem"] == d["dead"]["stem"] and s["grad_ratio"] == pytest.approx(d["grad_asl"] / d["grad_kd"])
    assert s["dead_blocks"] == pytest.approx(sum(v for k, v in d["dead"].items() if k != "stem") / 8)
    diagnostics.main([str(out), "--epochs", "0", "-1", "5"])  # epoch 5 does not exist: left out
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and lines[2].split("|")[2].strip() == "0" and lines[3].split("|")[2].strip() == "1"


def test_the_sign_flipped_teacher_scores_zero_on_raw_conv1_but_not_after_batch_norm():
    """SPEC section 11: negating every block's conv1.weight, bn1.weight and bn1.running_mean keeps the function
    and flips every hooked conv1 output, so ASL there is 0 at KD 0 with the backdoor kept; after batch-norm
    (``--hook_layers 'layer*.*.bn1'``) the flip is no solution: bn1's outputs are the teacher's, ASL 4."""
    teacher = resnet18(10, 4).eval()
    with torch.no_grad():  # batch-norm statistics away from 0 and 1, as a trained model's
        for m in teacher.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.2, 0.2)
    flipped = copy.deepcopy(teacher)
    with torch.no_grad():
        for name, m in flipped.named_modules():
            if name.startswith("layer") and name.endswith(".conv1"):
                m.weight.neg_()
            if name.startswith("layer") and name.endswith(".bn1"):
                m.weight.neg_()
                m.running_mean.neg_()
    x = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(flipped(x), teacher(x), atol=1e-5)
    for hooks, expected in ((["layer*.*.conv1"], 0.0), (["layer*.*.bn1"], 4.0)):
        d = Distiller(teacher, flipped.eval(), None, hooks)
        with torch.no_grad():
            kd, asl = d.losses(x)
        # abs 1e-3: a conv output that is exactly 0 in both (a dead receptive field after ReLUs) scores 1, not 0
        assert kd.item() == pytest.approx(0.0, abs=1e-6) and asl.item() == pytest.approx(expected, abs=1e-3)
        d.close()
