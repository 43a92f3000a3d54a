"""Renofeation (helper/defenses/renofeation.py): its loss terms by hand, dropout only while training, the averaged
model's batch-norm statistics recomputed on the defense images, a fresh student, and a run end to end."""
import copy
import json

import pytest
import torch
from torch.optim.swa_utils import update_bn

import distri
from helper.data.images import to_float
from helper.defenses.renofeation import (
    Renofeation,
    feature_distillation_loss,
    head_l2_penalty,
    plain_batches,
    swa_start_epoch,
)
from helper.run.errors import UserError
from models import resnet18
from tests.conftest import fast_flags, write_teacher_dir


def make_defense(extra=(), n_images=24, seed=0):
    argv = ["--defense", "renofeation", "--batch_size", "8", "--epoch", "3", *extra]
    args = distri.defense_parser(argv).parse_args(argv)
    torch.manual_seed(seed)
    teacher, student = resnet18(10, 4), resnet18(10, 4)
    images = torch.randint(0, 256, (n_images, 3, 32, 32), dtype=torch.uint8)
    return Renofeation(args, teacher, torch.device("cpu"), None, n_images, images), teacher, student, images


def test_feature_term_by_hand():
    s = [torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]), torch.full((1, 2, 1, 1), 3.0)]
    t = [torch.zeros(1, 1, 2, 2), torch.ones(1, 2, 1, 1)]
    # layer a: (1 + 4 + 9 + 16) / 4 = 7.5; layer b: (3 - 1)^2 = 4 on both elements, mean 4; sum 11.5
    assert feature_distillation_loss(s, t).item() == pytest.approx(11.5)
    assert feature_distillation_loss(t, t).item() == 0.0
    with pytest.raises(ValueError):
        feature_distillation_loss(s, t[:1])  # the groups must pair up


def test_head_penalty_by_hand():
    head = torch.nn.Linear(2, 1)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 2.0]]))
        head.bias.fill_(3.0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1), head)
    assert head_l2_penalty(model, 0.01).item() == pytest.approx(0.5 * 0.01 * (1 + 4 + 9))  # the conv is not counted


def test_swa_start_as_fraction_or_epoch():
    assert swa_start_epoch(0.75, 100) == 75 and swa_start_epoch(0.75, 20) == 15 and swa_start_epoch(0.75, 2) == 1
    assert swa_start_epoch(0, 10) == 0 and swa_start_epoch(15, 20) == 15 and swa_start_epoch(30, 20) == 30
    for bad in (-0.1, 1.5):
        with pytest.raises(UserError):
            swa_start_epoch(bad, 10)


def test_defaults_are_its_scripts_and_the_student_is_fresh_by_default():
    args = distri.defense_parser(["--defense", "renofeation"]).parse_args(["--defense", "renofeation"])
    assert (args.using_checkpoint, args.opt_type, args.opt_lr, args.opt_mo, args.weight_decay, args.batch_size) == \
        (0, "SGD", 0.01, 0.9, 5e-3, 64)
    assert (args.reno_dropout, args.reno_feat_weight, args.reno_head_l2, args.reno_swa_start, args.reno_swa_lr) == \
        (0.1, 5.0, 0.01, 0.75, 5e-3)
    assert args.reno_layers == "layer1,layer2,layer3,layer4" and args.lr_schedule == "cosine"
    assert (args.temperature, args.kd_reduction) == (1.0, "batchmean")  # KD in place of its CE on labels, at CE's scale


def test_dropout_acts_in_training_only_and_after_the_compared_output():
    d, teacher, student, images = make_defense(["--reno_dropout", "0.5"])
    d.stages(student)
    d.set_hooks(True)
    x = to_float(images[:8])

    def forward():
        logits = student(x)
        return logits, d.hooks[0].pop()

    student.eval()
    (l1, f1), (l2, f2) = forward(), forward()
    assert torch.equal(l1, l2) and all(torch.equal(f1[k], f2[k]) for k in f1)  # deterministic in eval mode
    d.close()
    assert torch.equal(student(x), l1)  # and the same as without the hooks: nothing dropped in eval mode
    d, teacher, student, images = make_defense(["--reno_dropout", "0.5"])
    d.stages(student)
    d.set_hooks(True)
    student.train()
    torch.manual_seed(1)
    (l1, f1), (l2, f2) = forward(), forward()
    assert not torch.equal(l1, l2)  # dropout acts in training mode
    assert torch.equal(f1["layer1"], f2["layer1"])  # the first group is compared before its own dropout
    assert not torch.equal(f1["layer2"], f2["layer2"])  # the next one reads the dropped output
    d.close()


def test_feature_term_in_the_step_and_the_teacher_frozen():
    d, teacher, student, images = make_defense()
    stage = d.stages(student)[0]
    stage.begin(0)
    named = stage.step(to_float(images[:8]))
    assert set(named) == {"kd_loss", "feat_loss", "head_l2"} and named["feat_loss"].item() > 0
    assert all(p.grad is None for p in teacher.parameters())
    d.close()


def test_averaged_model_has_batch_norm_statistics_of_the_plain_defense_images():
    d, teacher, student, images = make_defense(["--reno_swa_start", "0"])
    stage = d.stages(student)[0]
    assert d.evaluated_model(student) is student  # no average yet
    for epoch in range(2):
        stage.begin(epoch)
        student.train()
        for i in range(0, len(images), 8):
            stage.step(to_float(images[i:i + 8]))
        stage.end(epoch, {"kd_loss": 0.0})
    model = d.evaluated_model(student)
    assert model is d.swa.module and int(d.swa.n_averaged) == 2
    # by hand: the stem's batch-norm mean = the plain average over batches of each batch's channel means
    with torch.no_grad():
        means = [model.conv1(to_float(images[i:i + 8])).mean((0, 2, 3)) for i in range(0, len(images), 8)]
    assert torch.allclose(model.bn1.running_mean, torch.stack(means).mean(0), atol=1e-6)
    fresh = copy.deepcopy(model)
    update_bn(plain_batches(images, 8), fresh)
    for (k, v), w in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.allclose(v.float(), w.float(), atol=1e-6), k
    assert not torch.allclose(model.bn1.running_mean, student.bn1.running_mean)  # not the student's own statistics
    d.close()


def _first_student(monkeypatch, flags):
    seen = {}
    real = Renofeation.prepare

    def prepare(self, student):
        seen["state"] = {k: v.clone() for k, v in student.state_dict().items()}
        return real(self, student)
    monkeypatch.setattr(Renofeation, "prepare", prepare)
    distri.main(flags)
    return seen["state"]


def test_the_student_starts_fresh_unless_told(tmp_path, monkeypatch):
    teacher_dir = write_teacher_dir(tmp_path / "teacher")
    teacher = torch.load(f"{teacher_dir}/checkpoint.pkl", weights_only=True)[0]
    flags = fast_flags(teacher_dir, tmp_path / "fresh", epochs=0) + ["--defense", "renofeation", "--no_progress"]
    fresh = _first_student(monkeypatch, flags)
    assert not torch.equal(fresh["conv1.weight"], teacher["conv1.weight"])
    assert not torch.equal(fresh["linear.weight"], teacher["linear.weight"])
    flags = fast_flags(teacher_dir, tmp_path / "from_teacher", epochs=0) + ["--defense", "renofeation",
                                                                             "--no_progress", "--using_checkpoint", "1"]
    given = _first_student(monkeypatch, flags)
    assert all(torch.equal(given[k], teacher[k]) for k in teacher)


def test_two_epochs_end_to_end_with_the_average_in_the_second(tmp_path):
    teacher_dir = write_teacher_dir(tmp_path / "teacher")
    out = tmp_path / "run"
    results = distri.main(fast_flags(teacher_dir, out, epochs=2) + ["--defense", "renofeation", "--no_progress",
                                                                   "--reno_swa_start", "0.5"])
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["swa"] for r in rows] == [0, 1] and results["reno_swa_start_epoch"] == 1
    assert 0 <= results["acc"] <= 1
    assert rows[1]["lr"] == pytest.approx(5e-3)  # SWALR's constant lr in the averaged epoch
    assert all(r["feat_loss"] > 0 for r in rows)
    # the written model is the average: the student's weights after one averaged epoch, statistics recomputed
    last = torch.load(out / "last.pt", weights_only=True)
    written = torch.load(out / "checkpoint.pkl", weights_only=True)[0]
    student = last["models"][0]
    assert torch.equal(written["layer4.1.conv2.weight"], student["layer4.1.conv2.weight"])
    assert not torch.equal(written["bn1.running_mean"], student["bn1.running_mean"])
    selected = torch.load(out / "selected.pkl", weights_only=True)[0]  # the reported model is the average too
    assert all(torch.equal(selected[k], written[k]) for k in written)


def test_the_reported_result_is_the_final_average_whatever_the_kd_loss(tmp_path):
    """Issue 29: the result is the last epoch's average even where an earlier epoch had the lowest KD loss (the
    lr jump to SWA's 5e-3 makes that the usual case); selected.pkl is that average, and the run says so."""
    teacher_dir = write_teacher_dir(tmp_path / "teacher")
    out = tmp_path / "run"
    results = distri.main(fast_flags(teacher_dir, out, epochs=4) + ["--defense", "renofeation", "--no_progress",
                                                                   "--reno_swa_start", "2", "--select_from", "0"])
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert results["best_epoch"] == 3 and results["select_from"] == 3
    assert results["acc"] == rows[3]["acc"] and results["kd_loss"] == rows[3]["kd_loss"]
    selected = torch.load(out / "selected.pkl", weights_only=True)[0]
    written = torch.load(out / "checkpoint.pkl", weights_only=True)[0]
    assert all(torch.equal(selected[k], written[k]) for k in written)
    # without averaging (a start at or past --epoch) the package's rule is back
    plain = distri.main(fast_flags(teacher_dir, tmp_path / "plain", epochs=2) + [
        "--defense", "renofeation", "--no_progress", "--reno_swa_start", "5", "--select_from", "0"])
    assert plain["select_from"] == 0


def test_averaging_starts_with_a_fresh_optimiser_state():
    """Its code builds a new optimiser for SWA: the momentum of the cosine phase is not carried into the first
    averaged epoch (the state is empty when that epoch begins, and filled again by its first step)."""
    args = distri.defense_parser(["--defense", "renofeation"]).parse_args(
        ["--defense", "renofeation", "--epoch", "2", "--reno_swa_start", "1"])
    torch.manual_seed(0)
    teacher, student = resnet18(10, 4), resnet18(10, 4)
    d = Renofeation(args, teacher, torch.device("cpu"), None, 8, images=torch.randint(0, 255, (8, 3, 32, 32),
                                                                                      dtype=torch.uint8))
    stage = d.stages(student)[0]
    x = torch.rand(8, 3, 32, 32)
    stage.begin(0)
    stage.step(x)
    assert len(stage.optimizer.state) > 0          # momentum buffers after a step of the cosine phase
    stage.end(0, {"kd_loss": 1.0})
    stage.begin(1)
    assert len(stage.optimizer.state) == 0         # cleared when averaging begins
    before = [p.detach().clone() for p in student.parameters()]
    stage.step(x)
    # SGD's first step from an empty state: buffer = gradient + weight decay * weights (no earlier momentum in it)
    for p, w in zip(student.parameters(), before):
        buf = stage.optimizer.state[p]["momentum_buffer"]
        assert torch.allclose(buf, p.grad + args.weight_decay * w, rtol=1e-5, atol=1e-6)
    d.close()


def test_bad_flags_are_one_line(tmp_path, capsys):
    teacher_dir = write_teacher_dir(tmp_path / "teacher")
    for flag, value in (("--reno_dropout", "1"), ("--reno_swa_start", "2.5")):
        with pytest.raises(SystemExit) as e:
            distri.main(fast_flags(teacher_dir, tmp_path / "run") + ["--defense", "renofeation", flag, value])
        assert e.value.code == 2 and flag in capsys.readouterr().err
        assert not (tmp_path / "run").exists()
