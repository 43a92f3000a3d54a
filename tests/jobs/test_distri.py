"""End-to-end runs of distri.py and distri_dsextend.py on synthetic data with a narrow model, and bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch

import distri
from tests import ROOT, read_json, read_text
from tests.conftest import fast_flags

LOG_KEYS = {"epoch", "kd_loss", "asl", "lambda", "lr", "acc", "asr", "asr_nontarget", "conv_weight_norm", "target_acc"}
RESULT_KEYS = {"acc", "asr", "asr_nontarget", "best_epoch", "kd_loss", "teacher_acc", "teacher_asr", "target_acc",
               "teacher_target_acc"}


def _read_run(out):
    rows = [json.loads(line) for line in read_text(os.path.join(out, "log.jsonl")).splitlines()]
    results = read_json(os.path.join(out, "results.json"))
    args = read_json(os.path.join(out, "args.json"))
    return rows, results, args


def test_asd_run_writes_every_output(teacher_dir, tmp_path, capsys):
    out = tmp_path / "asd"
    results = distri.main(fast_flags(teacher_dir, out))
    rows, saved, args = _read_run(out)
    assert len(rows) == 2 and LOG_KEYS <= set(rows[0])
    assert [r["lambda"] for r in rows] == [0.0, 0.0]
    assert all(r["asl"] is not None and 0 <= r["asl"] <= 4 for r in rows)  # ASL is computed while lambda < 1
    assert RESULT_KEYS <= set(saved) and saved["best_epoch"] in (0, 1)
    best = rows[saved["best_epoch"]]
    assert saved["kd_loss"] == best["kd_loss"] == min(r["kd_loss"] for r in rows)
    assert saved["asr_last10_mean"] == pytest.approx((rows[0]["asr"] + rows[1]["asr"]) / 2)
    assert saved["acc"] == best["acc"] and saved["asr"] == best["asr"]
    assert saved == json.loads(json.dumps(results))
    assert args["ratio_type"] == "scheduler" and args["n_defense"] == 128 and len(args["hooked_layers"]) == 8
    ck = torch.load(out / "checkpoint.pkl", weights_only=True)
    assert isinstance(ck, list) and len(ck) == 1 and "layer4.1.conv2.weight" in ck[0]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "selected over all epochs" in printed  # 2 epochs < --select_from 50
    assert "epoch   1  kd" in printed
    assert "batches" in printed  # the tqdm bar, on by default
    # the teacher's line and the result line carry the target class's own accuracy
    assert f"target_acc {saved['teacher_target_acc']:.4f}" in printed.split("teacher:", 1)[1].splitlines()[0]
    assert f"target_acc {saved['target_acc']:.4f}" in printed.split("result (epoch", 1)[1].splitlines()[0]


def test_fix_run_is_plain_kd(teacher_dir, tmp_path, capsys):
    out = tmp_path / "kd"
    distri.main(fast_flags(teacher_dir, out) + ["--ratio_type", "fix", "--no_progress"])
    rows, saved, args = _read_run(out)
    assert all(r["asl"] is None and r["lambda"] is None and r["kd_weight"] == 1.0 for r in rows)
    assert saved["ratio_type"] == "fix"
    printed = capsys.readouterr().out
    assert "epoch   1  kd" in printed and "batches" not in printed and "epochs:" not in printed


def test_student_and_output_folder_are_a_valid_read_dir(teacher_dir, tmp_path):
    """The run folder holds checkpoint.pkl, pattern.pt and mask.pt: it can be distilled again."""
    first = tmp_path / "first"
    distri.main(fast_flags(teacher_dir, first, epochs=1))
    distri.main(fast_flags(first, tmp_path / "second", epochs=1))
    assert torch.equal(torch.load(first / "mask.pt", weights_only=True), torch.load(os.path.join(teacher_dir, "mask.pt"), weights_only=True))


def test_read_dir_variable_is_the_default(teacher_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(distri, "read_dir", teacher_dir)
    flags = fast_flags(teacher_dir, tmp_path / "r", epochs=1)[2:]  # drop --read_dir
    distri.main(flags)
    assert read_json(tmp_path / "r" / "args.json")["read_dir"] == teacher_dir


def test_fresh_student_and_selection_from_epoch(teacher_dir, tmp_path):
    out = tmp_path / "fresh"
    distri.main(fast_flags(teacher_dir, out, epochs=3) + ["--using_checkpoint", "0", "--select_from", "1"])
    rows, saved, _ = _read_run(out)
    assert saved["select_from"] == 1 and saved["best_epoch"] >= 1
    assert saved["kd_loss"] == min(r["kd_loss"] for r in rows[1:])


def test_dsextend_uses_train_plus_test(teacher_dir, tmp_path):
    out = tmp_path / "ext"
    flags = fast_flags(teacher_dir, out, epochs=2)
    flags.remove("--subset_rate")
    flags.remove("0.5")
    proc = subprocess.run([sys.executable, "distri_dsextend.py", *flags], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    _, saved, args = _read_run(out)
    assert args["finetune_extend"] and args["subset_rate"] == 1.0
    assert saved["n_defense"] == 256 + 128


def test_lr_drop_forced_on_waits_for_the_kd_loss_to_exceed_its_threshold(teacher_dir, tmp_path):
    """A KD loss that never rises above --lr_drop_kd never arms the drop (SPEC section 6); one above it at every
    epoch arms it without firing, except inside ASD's shift phase, where nothing arms it: the lr stays 1e-3."""
    for threshold in ("1e9", "1e-12"):
        out = tmp_path / f"drop{threshold}"
        distri.main(fast_flags(teacher_dir, out) + ["--lr_drop", "on", "--lr_drop_kd", threshold, "--lr_drop_to", "1e-5"])
        rows, saved, _ = _read_run(out)
        assert saved["lr_dropped_at"] is None and [r["lr"] for r in rows] == [1e-3, 1e-3]
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["lr_drops"][-1] == {"armed": False, "dropped_at": None}  # ASD: epochs 0-1 are its shift, which never arms
    kd = tmp_path / "kd"  # plain KD has no shift: a loss above the threshold arms the drop at once
    distri.main(fast_flags(teacher_dir, kd) + ["--ratio_type", "fix", "--lr_drop", "on", "--lr_drop_kd", "1e-12"])
    assert torch.load(kd / "last.pt", weights_only=True)["lr_drops"][-1] == {"armed": True, "dropped_at": None}


def test_asd_lr_drop_is_armed_at_the_end_of_its_shift_phase(teacher_dir, tmp_path):
    """ASD with a 1-epoch shift phase and the drop on: epoch 0 (ASL alone) keeps 1e-3, the drop fires at the end
    of epoch 1 (armed, KD loss below 1.0), epoch 2 runs at --lr_drop_to."""
    out = tmp_path / "asd-drop"
    distri.main(fast_flags(teacher_dir, out, epochs=3) + ["--defense", "asd", "--shift_epochs", "1", "--lr_drop", "on"])
    rows, saved, _ = _read_run(out)
    assert saved["lr_dropped_at"] == 1 and [r["lr"] for r in rows] == [1e-3, 1e-3, 1e-4]


# ---------------------------------------------------------------- bad input: one line, exit code 2

def _fails(flags, capsys, match):
    with pytest.raises(SystemExit) as e:
        distri.main(flags)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert match in err, err
    assert "Traceback" not in err
    return err


def test_missing_read_dir(tmp_path, capsys):
    err = _fails(fast_flags(tmp_path / "nowhere", tmp_path / "o"), capsys, "read_dir not found")
    assert err.count("\n") == 0
    assert not (tmp_path / "o").exists()


def test_missing_mask(teacher_dir, tmp_path, capsys):
    os.remove(os.path.join(teacher_dir, "mask.pt"))
    _fails(fast_flags(teacher_dir, tmp_path / "o"), capsys, "mask file not found")


def test_wrong_pattern_shape(teacher_dir, tmp_path, capsys):
    torch.save(torch.rand(3, 16, 16), os.path.join(teacher_dir, "pattern.pt"))
    _fails(fast_flags(teacher_dir, tmp_path / "o"), capsys, "pattern.pt has shape (3, 16, 16), expected (3, 32, 32)")


def test_checkpoint_not_fitting(teacher_dir, tmp_path, capsys):
    sd = torch.load(os.path.join(teacher_dir, "checkpoint.pkl"), weights_only=True)[0]
    sd["layer1.0.conv2.weight"] = torch.zeros(4, 4, 1, 1)
    torch.save([sd], os.path.join(teacher_dir, "checkpoint.pkl"))
    _fails(fast_flags(teacher_dir, tmp_path / "o"), capsys, "layer1.0.conv2.weight: (4, 4, 1, 1) vs model (4, 4, 3, 3)")


def test_width_flag_disagreeing_with_checkpoint(teacher_dir, tmp_path, capsys):
    _fails(fast_flags(teacher_dir, tmp_path / "o") + ["--width", "64"], capsys, "width-4 ResNet18")


@pytest.mark.parametrize("rate", ["0", "1.5"])
def test_subset_rate_out_of_range(teacher_dir, tmp_path, capsys, rate):
    _fails(fast_flags(teacher_dir, tmp_path / "o") + ["--subset_rate", rate], capsys, "must be in (0, 1]")


def test_unknown_dataset(teacher_dir, tmp_path, capsys):
    _fails(fast_flags(teacher_dir, tmp_path / "o") + ["--finetunedata", "imagenet"], capsys, "unknown --finetunedata 'imagenet'")


def test_existing_run_is_never_overwritten(teacher_dir, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "results.json").write_text("precious")
    _fails(fast_flags(teacher_dir, out), capsys, "already holds files")
    assert (out / "results.json").read_text() == "precious"


def test_non_finite_loss_stops_and_keeps_what_was_written(teacher_dir, tmp_path, capsys):
    out = tmp_path / "nan"
    _fails(fast_flags(teacher_dir, out, epochs=5) + ["--ratio_type", "fix", "--opt_lr", "1e30"], capsys,
           "non-finite loss at epoch")
    rows, saved, _ = _read_run(out)
    assert 1 <= len(rows) < 5 and saved["stopped"].startswith("non-finite loss")
    assert (out / "args.json").exists() and not (out / "checkpoint.pkl").exists()


def test_help_groups_flags():
    proc = subprocess.run([sys.executable, "distri.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0
    for group in ("Data:", "Model:", "Distillation:", "Optimisation:", "Output:", "System:"):
        assert group in proc.stdout
    for flag in ("--finetune_in_out", "--thresh_mask", "--using_checkpoint", "--select_from", "--lr_drop_kd"):
        assert flag in proc.stdout


def test_conv_weight_norm_sums_every_convolution():
    from helper.train.evaluate import conv_weight_norm
    from models import resnet18
    model = resnet18(width=4)
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.constant_(m.weight, 0.5)
    n_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv_weight_norm(model) == pytest.approx(0.5 * n_weights ** 0.5, rel=1e-6)


def test_evaluate_counts_by_hand_and_flags_a_constant_predictor():
    from helper.train.evaluate import EvalSet, evaluate

    class Constant(torch.nn.Module):
        def __init__(self, k):
            super().__init__()
            self.k = k

        def forward(self, x):
            out = torch.zeros(len(x), 10)
            out[:, self.k] = 1
            return out

    split = type("S", (), {"x": torch.zeros(4, 3, 32, 32, dtype=torch.uint8), "y": torch.tensor([0, 1, 2, 2])})
    ev = EvalSet.build(split, torch.ones(3, 32, 32), torch.ones(1, 32, 32), target=0, device="cpu")
    assert evaluate(Constant(0), ev) == {"acc": 0.25, "asr": 1.0, "asr_nontarget": 1.0, "ra": 0.0,
                                         "top_class_share": 1.0, "target_rate_clean": 1.0, "target_acc": 1.0}
    # RA: of the 3 triggered non-target images (labels 1, 2, 2), the two labelled 2 keep their label
    assert evaluate(Constant(2), ev) == {"acc": 0.5, "asr": 0.0, "asr_nontarget": 0.0, "ra": 2 / 3,
                                         "top_class_share": 1.0, "target_rate_clean": 0.0, "target_acc": 0.0}
    # the target class's own accuracy: 2 of the 3 images labelled 0 answered 0; none labelled 0 gives 0
    split = type("S", (), {"x": torch.zeros(4, 3, 32, 32, dtype=torch.uint8), "y": torch.tensor([0, 0, 0, 1])})
    ev = EvalSet.build(split, torch.ones(3, 32, 32), torch.ones(1, 32, 32), target=0, device="cpu")

    class FirstTwo(torch.nn.Module):  # class 0 for the first two images of a batch, class 1 for the rest
        def forward(self, x):
            out = torch.zeros(len(x), 10)
            out[:2, 0], out[2:, 1] = 1, 1
            return out
    m = evaluate(FirstTwo(), ev, batch_size=4)
    assert m["target_acc"] == 2 / 3 and m["acc"] == 0.75
    assert evaluate(Constant(1), EvalSet.build(type("S", (), {"x": torch.zeros(2, 3, 32, 32, dtype=torch.uint8),
                                                              "y": torch.tensor([1, 2])}),
                                               torch.ones(3, 32, 32), torch.ones(1, 32, 32), target=0,
                                               device="cpu"))["target_acc"] == 0.0


def test_dead_student_warning(teacher_dir, tmp_path, capsys):
    """A teacher whose stem is dead (bn1 weight and bias 0 -> all zeros after ReLU) answers one class."""
    sd = torch.load(os.path.join(teacher_dir, "checkpoint.pkl"), weights_only=True)[0]
    sd["bn1.weight"].zero_()
    sd["bn1.bias"].fill_(-1.0)
    torch.save([sd], os.path.join(teacher_dir, "checkpoint.pkl"))
    distri.main(fast_flags(teacher_dir, tmp_path / "dead", epochs=1) + ["--opt_lr", "0"])
    assert "its output no longer depends on its input" in capsys.readouterr().out
    assert read_json(tmp_path / "dead" / "results.json")["top_class_share"] == 1.0


def test_asl_on_first_sample_only_reproduces_the_public_code():
    from helper.defenses.asd import Distiller
    from helper.train.features import FeatureHooks
    from helper.train.losses import attention_shifting_loss
    from models import resnet18
    torch.manual_seed(0)
    teacher, student = resnet18(width=4).eval(), resnet18(width=4)
    x = torch.rand(6, 3, 32, 32)
    opt = torch.optim.SGD(student.parameters(), lr=0.0)
    feats = {}
    for name, d in (("all", Distiller(teacher, student, opt, ["layer*.*.conv1"])),
                    ("first", Distiller(teacher, student, opt, ["layer*.*.conv1"], asl_samples="first"))):
        feats[name] = d.losses(x)[1].item()
        d.close()
    with FeatureHooks(teacher) as t, FeatureHooks(student) as s:
        teacher(x)
        student(x)
        expected = sum(attention_shifting_loss(t.features[n][:1], s.features[n][:1]) for n in t.layers) / 8
    assert feats["first"] == pytest.approx(expected.item(), rel=1e-6)
    assert feats["first"] != pytest.approx(feats["all"], rel=1e-3)



def test_finetune_in_uses_the_teachers_own_training_set(teacher_dir, tmp_path):
    """With --finetune_in_out in, --finetunedata is never read: an unknown name there does not matter."""
    out = tmp_path / "in"
    distri.main(fast_flags(teacher_dir, out, epochs=1) + ["--finetune_in_out", "in", "--finetunedata", "imagenet"])
    assert read_json(out / "results.json")["n_defense"] == 128


# ---------------------------------------------------------------- inputs that used to get through

def _npz(path, **arrays):
    import numpy as np
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize("case,match", [
    ("pattern", "pattern.pt holds values in [-5, 5]; a trigger's pattern and mask lie in [0, 1]"),
    ("mask", "mask.pt holds values in [-2, 2]"),
    ("thresh_range", "--thresh_mask must be in [0, 1), not 5.0"),
    ("thresh_all", "--thresh_mask 0.5 removes the whole mask (its largest value is 0.3)"),
    ("temperature", "--temperature must be in [0.05, 1000], not 1e-30"),
    ("lr_drop_to", "--lr_drop_to must be >= 0"),
    ("device", "--device mps: this package runs on cpu or cuda"),
    ("negative_labels", "labels must be >= 0, found -3"),
    ("empty_test", "has no test images"),
    ("object_array", "Object arrays cannot be loaded"),
])
def test_bad_values_are_one_line_and_exit_2(teacher_dir, tmp_path, capsys, case, match):
    import numpy as np
    flags = fast_flags(teacher_dir, tmp_path / "o")
    x = np.zeros((4, 32, 32, 3), np.uint8)
    if case in ("pattern", "mask"):
        shape, bound = ((3, 32, 32), 5.0) if case == "pattern" else ((1, 32, 32), 2.0)
        t = torch.zeros(shape)
        t.view(-1)[:2] = torch.tensor([-bound, bound])
        torch.save(t, os.path.join(teacher_dir, f"{case}.pt"))
    extra = {"thresh_range": ["--thresh_mask", "5"], "thresh_all": ["--thresh_mask", "0.5"],
             "temperature": ["--temperature", "1e-30"], "lr_drop_to": ["--lr_drop_to", "-1"],
             "device": ["--device", "mps"]}.get(case, [])
    if case == "negative_labels":
        extra = ["--dataset", _npz(tmp_path / "d.npz", x=x, y=np.array([0, 1, -3, 2]))]
    if case == "empty_test":
        extra = ["--dataset", _npz(tmp_path / "d.npz", x_train=x, y_train=np.zeros(4, int),
                                   x_test=x[:0], y_test=np.zeros(0, int))]
    if case == "object_array":
        extra = ["--finetunedata", _npz(tmp_path / "d.npz", x=np.array([x[0], "a"], dtype=object), y=np.zeros(2, int))]
    err = _fails(flags + extra, capsys, match)
    assert err.count("\n") == 0 and not (tmp_path / "o").exists()  # checked before the run folder is made


def test_eval_every_keeps_selection_and_evaluates_the_selected_state_in_full(teacher_dir, tmp_path):
    """Evaluation draws no random numbers, so the run with --eval_every 3 trains exactly as the one evaluated every
    epoch: the same selected epoch, and its numbers come from a full evaluation of the selected state."""
    flags = fast_flags(teacher_dir, tmp_path / "every", epochs=3) + ["--ratio_type", "fix", "--no_progress"]
    distri.main(flags)
    rows_1, saved_1, _ = _read_run(tmp_path / "every")
    flags[flags.index("--output_dir") + 1] = str(tmp_path / "third")
    distri.main(flags + ["--eval_every", "3"])
    rows_3, saved_3, _ = _read_run(tmp_path / "third")
    assert ["acc" in r for r in rows_3] == [False, False, True]
    assert [r["kd_loss"] for r in rows_3] == [r["kd_loss"] for r in rows_1]
    assert saved_3["best_epoch"] == saved_1["best_epoch"]
    for key in ("acc", "asr", "asr_nontarget", "ra"):
        assert saved_3[key] == saved_1[key]
    assert saved_3.get("selected_evaluated_at_end", False) == (saved_1["best_epoch"] != 2)
