"""The defenses of helper/defenses against hand-written references, and every defense end to end."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import adba
import distri
from helper.data.images import cutmix, cutmix_box
from helper.defenses import DEFENSES
from helper.defenses.abd import shuffled_copy, suspicious, vaccine_loss
from helper.defenses.bcu import PARTS, fresh_resnet18, reinitialise_
from helper.run.runlog import read_jsonl
from helper.train.losses import attention_distillation_loss, attention_map, hard_label_ce, kd_loss, kd_per_sample
from helper.train.schedule import bcu_temperature, cosine_lr
from models import resnet18
from tests import ROOT, read_json
from tests.conftest import fast_flags

# ---------------------------------------------------------------- BCU

def _is_bn(name):
    return ".bn" in name or name.startswith("bn") or "shortcut.1" in name


def test_bcu_reinitialises_each_layer_at_its_rate_and_keeps_batch_norm():
    torch.manual_seed(0)
    model = resnet18(10, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ratios = dict(zip(PARTS, (0.01, 0.05, 0.1, 0.2, 0.3, 0.5)))
    shares = reinitialise_(model, ratios, torch.Generator().manual_seed(1))
    after = model.state_dict()
    changed = {part: [0, 0] for part in PARTS}
    for k, v in after.items():
        if _is_bn(k):
            assert torch.equal(v, before[k]), k  # batch-norm parameters and running statistics untouched
            continue
        part = k.split(".")[0]
        changed[part][0] += int((v != before[k]).sum())
        changed[part][1] += v.numel()
    for part, p in ratios.items():
        k, n = changed[part]
        assert shares[part] == pytest.approx(k / n)  # the reported share is what changed
        assert abs(k / n - p) <= 5 * math.sqrt(p * (1 - p) / n), (part, k / n, p)  # 5 sigma of a binomial


def test_bcu_fresh_model_is_kaiming_normal_fan_out():
    model = fresh_resnet18(10, 16, torch.Generator().manual_seed(0))
    w = model.layer4[0].conv2.weight  # 128 x 128 x 3 x 3: fan_out = 128 * 9
    assert w.std().item() == pytest.approx(math.sqrt(2 / (128 * 9)), rel=0.02)
    assert w.mean().abs().item() < 0.01 * w.std().item() * 10
    bound = 1 / math.sqrt(model.linear.weight.shape[1])
    assert model.linear.weight.abs().max() <= bound and model.linear.weight.abs().max() > 0.9 * bound


def test_bcu_temperature_rises_from_one_to_four():
    assert bcu_temperature(0, 100) == pytest.approx(1.03)
    assert bcu_temperature(49, 100) == pytest.approx(2.5)
    assert bcu_temperature(99, 100) == pytest.approx(4.0)


def test_cosine_lr():
    assert cosine_lr(0.01, 0, 100) == 0.01
    assert cosine_lr(0.01, 50, 100) == pytest.approx(0.005)
    assert cosine_lr(0.01, 100, 100) == pytest.approx(0.0)


# ---------------------------------------------------------------- NAD

def test_attention_map_and_nad_loss_by_hand():
    f = torch.tensor([[[[1.0, 2.0]], [[-1.0, 0.0]]]])  # (1, 2 channels, 1, 2): sum_c |F|^2 = [2, 4]
    a = attention_map(f)
    torch.testing.assert_close(a, torch.tensor([[2.0, 4.0]]) / (math.sqrt(20) + 1e-6))
    g = torch.tensor([[[[3.0, 0.0]], [[0.0, 0.0]]]])  # map [9, 0] -> [1, 0] (up to the 1e-6)
    expected = ((2 / math.sqrt(20) - 1) ** 2 + (4 / math.sqrt(20)) ** 2) / 2
    assert attention_distillation_loss(f, g).item() == pytest.approx(expected, rel=1e-5)
    s = f.clone().requires_grad_()
    attention_distillation_loss(s, g).backward()
    assert s.grad.abs().sum() > 0  # the student's map carries gradient, the teacher's does not


# ---------------------------------------------------------------- ABD and fine-tuning

def test_abd_flags_samples_the_shuffled_ensemble_agrees_on():
    teacher = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]])
    ensemble = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 0, 2.0]])
    assert suspicious(ensemble, teacher).tolist() == [True, False, True]


def test_abd_vaccine_loss_by_hand():
    kd = torch.tensor([1.0, 2.0, 3.0, 4.0])
    flagged = torch.tensor([False, True, False, True])
    assert vaccine_loss(kd, flagged, 0.1).item() == pytest.approx((1 + 3) / 2 - 0.1 * (2 + 4) / 2)
    # an all-flagged batch: finite, -coef x mean KD (its code divides by 0 kept samples: NaN)
    assert vaccine_loss(kd, torch.ones(4, dtype=torch.bool), 0.1).item() == pytest.approx(-0.25)
    assert vaccine_loss(kd, torch.zeros(4, dtype=torch.bool), 0.1).item() == pytest.approx(2.5)


def test_abd_shuffles_the_input_channels_of_the_last_five_convs_only():
    torch.manual_seed(0)
    model = resnet18(10, 4)
    copy = shuffled_copy(model, 5, torch.Generator().manual_seed(0))
    changed = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)
               and not torch.equal(m.weight, dict(copy.named_modules())[n].weight)]
    assert changed == ["layer3.1.conv2", "layer4.0.conv1", "layer4.0.conv2", "layer4.1.conv1", "layer4.1.conv2"]
    for name in changed:
        w, w2 = dict(model.named_modules())[name].weight, dict(copy.named_modules())[name].weight
        # the same input-channel slices, in another order
        assert sorted(map(tuple, w.transpose(0, 1).flatten(1).tolist())) == sorted(map(tuple, w2.transpose(0, 1).flatten(1).tolist()))


def test_cutmix_box_by_hand():
    """ABD's rand_bbox: side int(32 sqrt(1 - lam)), centred, clipped to the image."""
    assert cutmix_box(32, 0.75, 16, 16) == (8, 8, 24, 24)        # side 16
    assert cutmix_box(32, 0.75, 2, 30) == (0, 22, 10, 32)        # clipped at both edges
    assert cutmix_box(32, 1.0, 5, 5) == (5, 5, 5, 5)             # lam 1: an empty box
    assert cutmix_box(32, 0.0, 16, 16) == (0, 0, 32, 32)


def test_cutmix_fills_one_box_from_a_permuted_batch_and_is_reproducible():
    x = torch.arange(8.0)[:, None, None, None].expand(8, 3, 32, 32).contiguous()  # image i is all i
    boxes = 0
    for seed in range(20):  # Beta(0.25, 0.25) puts lam near 0 or 1: some boxes are empty, some the whole image
        mixed = cutmix(x, np.random.default_rng(seed))
        assert torch.equal(mixed, cutmix(x, np.random.default_rng(seed)))           # the rng decides everything
        changed = (mixed != x).any(0).any(0)                                        # 32 x 32: where an image changed
        if not changed.any():
            continue
        boxes += 1
        rows, cols = changed.nonzero(as_tuple=True)
        box = changed[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert box.all() and changed.sum() == box.numel()                           # one rectangle in every image
        assert sorted(mixed[:, 0, rows.min(), cols.min()].tolist()) == list(range(8))  # a permutation of the batch
        assert ((mixed == x) | changed).all()                                       # nothing outside the box moved
    assert boxes >= 5
    assert torch.equal(x, torch.arange(8.0)[:, None, None, None].expand(8, 3, 32, 32))  # the input is untouched
    assert cutmix(x, np.random.default_rng(0), prob=0.0) is x and cutmix(x, np.random.default_rng(0), beta=0) is x


def test_hard_label_ce_and_per_sample_kd():
    torch.manual_seed(0)
    s, t = torch.randn(5, 10), torch.randn(5, 10)
    assert hard_label_ce(s, t).item() == pytest.approx(F.cross_entropy(s, t.argmax(1)).item())
    assert kd_per_sample(s, t, 8.0).mean().item() == pytest.approx(kd_loss(s, t, 8.0, "batchmean").item(), rel=1e-6)


# ---------------------------------------------------------------- every defense, end to end

NAMES = sorted(DEFENSES)
EXTRA = {"nad": ["--nad_teacher_epochs", "1"]}


def _run(teacher_dir, out, name, extra=()):
    results = distri.main(fast_flags(teacher_dir, out, epochs=2) + ["--defense", name, "--no_progress",
                                                                    *EXTRA.get(name, []), *extra])
    return results, read_jsonl(os.path.join(out, "log.jsonl")), read_json(os.path.join(out, "args.json"))


@pytest.mark.parametrize("name", NAMES)
def test_every_defense_runs_and_writes_the_run_folder(teacher_dir, tmp_path, name):
    out = tmp_path / name
    results, rows, args = _run(teacher_dir, out, name)
    for f in ("args.json", "log.jsonl", "results.json", "checkpoint.pkl", "selected.pkl", "pattern.pt", "mask.pt",
              "curves.png"):
        assert os.path.isfile(out / f), f
    assert results["defense"] == args["defense"] == name
    student_rows = [r for r in rows if "stage" not in r]
    assert len(student_rows) == 2 and all(math.isfinite(r["kd_loss"]) for r in rows)
    assert {"acc", "asr", "asr_nontarget", "ra", "lr", "target_acc"} <= set(student_rows[0])
    assert results["best_epoch"] in (0, 1) and results["kd_loss"] == min(r["kd_loss"] for r in student_rows)
    assert 0 <= results["ra"] <= 1 and "teacher_ra" in results
    assert results["target_acc"] == student_rows[results["best_epoch"]]["target_acc"] and "teacher_target_acc" in results
    if name == "nad":
        assert [r["stage"] for r in rows if "stage" in r] == ["nad_teacher"]


def test_defaults_are_the_defenses_own_and_a_given_flag_wins(teacher_dir, tmp_path):
    _, rows, args = _run(teacher_dir, tmp_path / "bcu", "bcu", ["--weight_decay", "0.001"])
    assert args["opt_lr"] == 0.01 and args["lr_schedule"] == "cosine" and args["bcu_ratios"][4] == 0.27
    assert args["batch_size"] == 64 and args["weight_decay"] == 0.001 and args["epoch"] == 2  # given flags win
    # BCU's cosine has T_max 100 whatever the run's length: 0.01 (1 + cos(pi / 100)) / 2 after one epoch
    assert [r["lr"] for r in rows] == [0.01, pytest.approx(0.01 * (1 + math.cos(math.pi / 100)) / 2)]
    assert args["lr_period"] == 100 and [r["bcu_t"] for r in rows] == [2.5, 4.0]
    _, rows, _ = _run(teacher_dir, tmp_path / "bcu2", "bcu", ["--lr_period", "2"])
    assert [r["lr"] for r in rows] == [0.01, pytest.approx(0.005)]  # a given period wins: cosine over 2 epochs
    _, rows, args = _run(teacher_dir, tmp_path / "abd", "abd")
    assert args["opt_type"] == "Adam" and args["temperature"] == 8.0 and args["batch_size"] == 64  # (given)
    assert args["using_checkpoint"] == 0 and args["lr_schedule"] == "step"  # ABD's code: a fresh student, steps
    assert args["lr_milestones"] == [150, 300, 600] and args["lr_gamma"] == 0.5 and args["abd_cutmix_beta"] == 0.25
    assert [r["lr"] for r in rows] == [1e-3, 1e-3]
    nad = distri.defense_parser(["--defense", "nad"]).parse_args(["--defense", "nad"])
    assert nad.opt_nesterov == 1 and nad.opt_type == "SGD"
    _, _, args = _run(teacher_dir, tmp_path / "asd", "asd")
    assert args["opt_lr"] == 1e-3 and args["ratio_type"] == "scheduler" and args["temperature"] == 40.0


def test_kd_defense_is_asd_with_ratio_fix(teacher_dir, tmp_path):
    a, rows_a, _ = _run(teacher_dir, tmp_path / "a", "kd")
    b, rows_b, _ = _run(teacher_dir, tmp_path / "b", "asd", ["--ratio_type", "fix"])
    assert [r["kd_loss"] for r in rows_a] == [r["kd_loss"] for r in rows_b]
    assert all(r["asl"] is None for r in rows_a)


def test_zero_lr_reports_the_prepared_student(teacher_dir, tmp_path):
    """BCU with --opt_lr 0: the student at the end is the re-initialised teacher, not the teacher."""
    out = tmp_path / "bcu0"
    results, _, _ = _run(teacher_dir, out, "bcu", ["--opt_lr", "0", "--bcu_ratios", "0.5", "0.5", "0.5", "0.5", "0.5", "0.5"])
    assert results["final"]["acc"] == results["student_init"]["acc"]
    assert set(results["bcu_reinit_share"]) == set(PARTS)
    teacher = torch.load(os.path.join(teacher_dir, "checkpoint.pkl"), weights_only=True)[0]
    final = torch.load(out / "checkpoint.pkl", weights_only=True)[0]
    share = (final["layer4.1.conv2.weight"] != teacher["layer4.1.conv2.weight"]).float().mean().item()
    assert 0.4 < share < 0.6 and torch.equal(final["bn1.running_var"], teacher["bn1.running_var"])


def test_negative_lr_is_refused(teacher_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        distri.main(fast_flags(teacher_dir, tmp_path / "o") + ["--opt_lr", "-1"])
    assert e.value.code == 2 and "--opt_lr must be >= 0" in capsys.readouterr().err


def test_defense_help_shows_its_group_and_defaults():
    proc = subprocess.run([sys.executable, "distri.py", "--defense", "bcu", "--help"], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    assert "Defense bcu:" in text and "--bcu_ratios" in text and "[0.01, 0.01, 0.03, 0.09, 0.27, 0.1]" in text
    assert "--opt_lr OPT_LR learning rate" in text and "(default: 0.01)" in text
    assert "--ratio_type {scheduler,fix}" not in text  # only the chosen defense's group


def test_unknown_defense_is_one_error(tmp_path):
    proc = subprocess.run([sys.executable, "distri.py", "--defense", "nope"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice: 'nope'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def adba_teacher(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("adba") / "teacher")
    adba.main(["--dataset", "synthetic", "--synthetic_train", "192", "--synthetic_test", "64", "--width", "4",
               "--epochs", "1", "--batch_size", "64", "--device", "cpu", "--no_progress", "--output_dir", out])
    return out


@pytest.mark.parametrize("name", NAMES)
def test_every_defense_runs_on_an_adba_folder(adba_teacher, tmp_path, name):
    flags = ["--read_dir", adba_teacher, "--output_dir", str(tmp_path / name), "--dataset", "synthetic",
             "--finetunedata", "synthetic", "--synthetic_train", "192", "--synthetic_test", "64", "--subset_rate", "0.5",
             "--epoch", "2", "--batch_size", "32", "--device", "cpu", "--no_progress", "--defense", name]
    results = distri.main(flags + EXTRA.get(name, []))
    teacher = read_json(os.path.join(adba_teacher, "results.json"))
    assert results["teacher_acc"] == teacher["acc"] and results["teacher_asr"] == teacher["asr"]
    assert os.path.isfile(tmp_path / name / "selected.pkl")
