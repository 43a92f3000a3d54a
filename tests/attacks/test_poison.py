"""BadNets, Blended and clean teachers (helper/attacks/poison.py, adba.py --attack), --trigger_dir, the inert-trigger
warning and the re-tuning attack (helper/jobs/retune.py, distri.py --retune): CPU, synthetic data, narrow models."""
import hashlib
import json
import os

import pytest
import torch

import adba
import distri
from helper.attacks.options import attack_parser
from helper.attacks.poison import POISONING_DEFAULTS
from helper.data.trigger import inert_trigger_warning, trigger_stats
from helper.attacks.poison import (
    BLENDED_ALPHA,
    badnets_trigger,
    blended_trigger,
    clean_metrics,
    make_trigger,
    poison_index,
    stamp_batch,
)
from helper.data.images import Split, synthetic_split
from helper.data.inputs import retune_set
from helper.data.teacher_dir import read_teacher, teacher_attack
from helper.data.trigger import apply_trigger, poisoned_labels
from helper.jobs.retune import retune
from helper.train.evaluate import EvalSet, evaluate
from models import resnet18
from tests import read_bytes, read_json, read_text
from tests.conftest import TEST_WIDTH, write_teacher_dir

TINY = ["--dataset", "synthetic", "--synthetic_train", "192", "--synthetic_test", "64", "--width", str(TEST_WIDTH),
        "--batch_size", "64", "--eval_batch_size", "64", "--no_progress", "--device", "cpu"]


def defense_flags(read_dir, output_dir, epochs=1):
    """distri.py on the same synthetic test set as TINY (so the teacher's numbers can be compared)."""
    return ["--read_dir", str(read_dir), "--output_dir", str(output_dir), "--dataset", "synthetic",
            "--finetunedata", "synthetic", "--synthetic_train", "192", "--synthetic_test", "64", "--subset_rate", "0.5",
            "--batch_size", "64", "--eval_batch_size", "64", "--epoch", str(epochs), "--device", "cpu", "--no_progress"]


def sha256(path):
    return hashlib.sha256(read_bytes(path)).hexdigest()


def results_of(folder):
    return read_json(os.path.join(folder, "results.json"))


# ---------------------------------------------------------------- the triggers, by hand

def test_badnets_sets_exactly_the_bottom_right_3x3_to_white():
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 0.9  # no pixel is 1.0 already
    xt = apply_trigger(x, *badnets_trigger())
    changed = (xt != x).any(0).any(0)  # (32, 32): a pixel changed in any image or channel
    expected = torch.zeros(32, 32, dtype=torch.bool)
    expected[29:32, 29:32] = True
    assert torch.equal(changed, expected)
    assert (xt[:, :, 29:32, 29:32] == 1.0).all()
    pattern, mask = badnets_trigger()
    assert pattern.shape == (3, 32, 32) and mask.shape == (1, 32, 32) and mask.sum() == 9


def test_blended_is_a_fixed_noise_image_at_0_2_everywhere():
    pattern, mask = blended_trigger()
    assert (mask == BLENDED_ALPHA).all() and BLENDED_ALPHA == 0.2
    assert 0 <= pattern.min() and pattern.max() <= 1 and pattern.std() > 0.2  # uniform noise, not a constant
    torch.manual_seed(123)  # the global seed (--seed) does not move it
    assert torch.equal(blended_trigger()[0], pattern)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(apply_trigger(x, pattern, mask), 0.8 * x + 0.2 * pattern)
    assert make_trigger("none") is None and torch.equal(make_trigger("blended")[0], pattern)


def test_stamp_batch_stamps_only_the_flagged_images():
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    flags = torch.tensor([True, False, True])
    out = stamp_batch(x, flags, *badnets_trigger())
    assert torch.equal(out[1], x[1])
    assert torch.equal(out[[0, 2]], apply_trigger(x[[0, 2]], *badnets_trigger()))


def test_the_poisoned_share_is_a_fixed_tenth_from_every_class_relabelled_to_the_target():
    labels = synthetic_split("task", 1000, "train", seed=0).y
    index = poison_index(len(labels), 0.1, seed=3)
    assert len(index) == 100 and len(index.unique()) == 100
    assert torch.equal(index, poison_index(len(labels), 0.1, seed=3))  # fixed across calls with the same seed
    assert not torch.equal(index, poison_index(len(labels), 0.1, seed=4))
    assert len(labels[index].unique()) >= 8  # drawn from (nearly) every class, not one
    new, stamp = poisoned_labels(labels, index, target=0)
    assert int(stamp.sum()) == 100 and torch.equal(stamp.nonzero().flatten(), index)
    assert (new[index] == 0).all() and torch.equal(new[~stamp], labels[~stamp])
    assert len(poison_index(192, 0.1, seed=0)) == 19  # round(0.1 * 192)


def test_the_poisoning_attacks_get_backdoorbenchs_recipe_and_adba_keeps_its_own():
    bb = attack_parser(["--attack", "badnets"]).parse_args(["--attack", "badnets"])
    assert {k: getattr(bb, k) for k in POISONING_DEFAULTS} == POISONING_DEFAULTS
    assert (bb.lr, bb.momentum, bb.batch_size, bb.epochs, bb.target_label) == (0.01, 0.9, 128, 100, 0)
    ad = attack_parser([]).parse_args([])
    assert (ad.attack, ad.poison_rate, ad.weight_decay, ad.lr_schedule) == ("adba", 0.3, 0.0, "none")
    given = attack_parser(["--attack", "blended", "--poison_rate", "0.05"]).parse_args(
        ["--attack", "blended", "--poison_rate", "0.05"])
    assert given.poison_rate == 0.05


# ---------------------------------------------------------------- adba.py --attack, end to end

@pytest.fixture(scope="module")
def trigger_folder(tmp_path_factory):
    """A teacher folder whose trigger (a 6x6 square of 0.3) a clean teacher is measured with."""
    return write_teacher_dir(tmp_path_factory.mktemp("trig") / "teacher")


@pytest.mark.parametrize("attack", ["badnets", "blended", "none"])
def test_attack_writes_a_teacher_folder_a_defense_run_accepts(attack, trigger_folder, tmp_path):
    out = tmp_path / attack
    extra = ["--trigger_dir", trigger_folder] if attack == "none" else []
    metrics = adba.main(TINY + ["--attack", attack, "--epochs", "2", "--output_dir", str(out)] + extra)
    saved = results_of(out)
    assert saved["attack"] == attack == teacher_attack(str(out)) and saved["epochs"] == 2
    assert read_json(out / "args.json")["attack"] == attack
    for name in ("checkpoint.pkl", "args.json", "log.jsonl", "curves.png"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in read_text(out / "log.jsonl").splitlines()]
    assert [r["phase"] for r in rows] == [attack, attack] and rows[1]["lr"] < rows[0]["lr"]  # cosine
    for key in ("acc", "asr", "asr_nontarget", "ra", "psnr", "ssim", "trigger_vanished"):
        assert key in saved, key
    if attack == "none":
        assert not (out / "pattern.pt").exists() and not (out / "mask.pt").exists()
        assert saved["n_poisoned"] == 0 and saved["trigger_dir"] == trigger_folder
    else:
        _, pattern, mask = read_teacher(str(out))
        assert torch.equal(pattern, make_trigger(attack)[0]) and torch.equal(mask, make_trigger(attack)[1])
        assert saved["n_poisoned"] == 19 and sum(saved["poisoned_classes"]) == 19
        assert (out / "trigger.png").is_file() and not saved["trigger_vanished"]
    results = distri.main(defense_flags(out, tmp_path / "kd") + ["--defense", "kd"] + extra)
    assert results["teacher_acc"] == pytest.approx(metrics["acc"])
    assert results["teacher_asr"] == pytest.approx(metrics["asr"])
    assert results["teacher_attack"] == attack


def test_a_poisoning_attack_stopped_and_resumed_equals_it_straight_through(tmp_path, monkeypatch, capsys):
    from tests.run.test_resume import _no_times, _read, stop_at_step
    flags = TINY + ["--attack", "badnets", "--epochs", "3"]
    adba.main(flags + ["--output_dir", str(tmp_path / "straight")])
    out = str(tmp_path / "stopped")
    stop_at_step(monkeypatch, 5)  # 3 steps per epoch: in the second
    with pytest.raises(SystemExit) as e:
        adba.main(flags + ["--output_dir", out])
    assert e.value.code == 130 and "--resume" in capsys.readouterr().err
    assert results_of(out) == {"stopped": "interrupted", "epochs_run": 1}
    monkeypatch.undo()
    adba.main(flags + ["--output_dir", out, "--resume"])
    straight, resumed = _read(tmp_path / "straight"), _read(out)
    assert _no_times(resumed[0]) == _no_times(straight[0]) and resumed[1] == straight[1]


def test_a_clean_teacher_without_trigger_dir_is_one_line_asking_for_it(tmp_path, capsys):
    folder = write_teacher_dir(tmp_path / "clean")
    os.remove(os.path.join(folder, "pattern.pt"))
    os.remove(os.path.join(folder, "mask.pt"))
    with pytest.raises(SystemExit) as e:
        distri.main(defense_flags(folder, tmp_path / "o"))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "holds no trigger" in err and "pass --trigger_dir" in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_trigger_dir_outside_attack_none_is_refused(trigger_folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        adba.main(TINY + ["--attack", "badnets", "--trigger_dir", trigger_folder, "--output_dir", str(tmp_path / "o")])
    assert e.value.code == 2 and "--trigger_dir is for --attack none" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_trigger_dir_measures_with_the_other_folders_trigger(tmp_path):
    teacher = write_teacher_dir(tmp_path / "teacher", seed=0)
    other = str(tmp_path / "other")
    write_teacher_dir(other, seed=1)
    pattern, mask = torch.zeros(3, 32, 32), torch.zeros(1, 32, 32)
    mask[:, :8, :8] = 1.0  # a trigger unlike the teacher's own (a 6x6 square of 0.3 bottom right)
    torch.save(pattern, os.path.join(other, "pattern.pt"))
    torch.save(mask, os.path.join(other, "mask.pt"))
    out = tmp_path / "run"
    results = distri.main(defense_flags(teacher, out, epochs=1) + ["--ratio_type", "fix", "--trigger_dir", other])
    model, own_pattern, own_mask = read_teacher(teacher)
    test = synthetic_split("task", 64, "test", seed=0)
    expected = evaluate(model, EvalSet.build(test, pattern, mask, 0, torch.device("cpu")))
    assert results["teacher_asr"] == expected["asr"] and results["teacher_ra"] == expected["ra"]
    assert results["trigger_dir"] == other
    # a random teacher answers one class whatever its input, so the PSNR tells the two triggers apart
    psnr_other = trigger_stats(pattern, mask, test.x, with_ssim=False)["psnr"]
    assert results["trigger_psnr"] == pytest.approx(psnr_other)
    assert psnr_other != pytest.approx(trigger_stats(own_pattern, own_mask, test.x, with_ssim=False)["psnr"])
    assert torch.equal(torch.load(out / "mask.pt", weights_only=True), mask)  # the run folder keeps what it measured with
    assert not torch.equal(own_mask, mask)


# ---------------------------------------------------------------- the inert-trigger warning

def test_a_teacher_with_an_all_zero_mask_is_warned_about_before_training(tmp_path, capsys):
    folder = write_teacher_dir(tmp_path / "zero", mask_value=0.0)
    results = distri.main(defense_flags(folder, tmp_path / "o") + ["--ratio_type", "fix"])
    printed = capsys.readouterr().out
    line = [ln for ln in printed.splitlines() if "says nothing about removal" in ln]
    assert len(line) == 1 and line[0].startswith("warning: ") and "dB from clean" in line[0]
    assert printed.index("says nothing about removal") < printed.index("epoch   0")  # before training
    assert results_of(tmp_path / "o")["warnings"] == results["warnings"] == [line[0][len("warning: "):]]


def test_inert_rule():
    working = {"mask_share": 0.01, "psnr": 25.0}
    assert inert_trigger_warning(0.9, working) is None
    assert "below 0.2" in inert_trigger_warning(0.1, working)
    assert "50.3 dB" in inert_trigger_warning(0.9, {"mask_share": 0.01, "psnr": 50.3})
    assert "short or failed attack" in inert_trigger_warning(0.1, working)
    assert "clean model" in inert_trigger_warning(0.1, working, attack="none")


# ---------------------------------------------------------------- the re-tuning attack

def test_retune_set_is_fixed_and_poisons_only_non_target_images():
    split = synthetic_split("task", 300, "train", seed=0)
    data, stamp = retune_set(split, 100, 5, target=0, seed=7)
    again, stamp_again = retune_set(split, 100, 5, target=0, seed=7)
    assert len(data) == 100 and int(stamp.sum()) == 5
    assert torch.equal(data.x, again.x) and torch.equal(data.y, again.y) and torch.equal(stamp, stamp_again)
    assert (data.y[stamp] == 0).all()
    originals = {bytes(x.numpy().tobytes()): int(y) for x, y in zip(split.x, split.y)}
    assert all(originals[bytes(x.numpy().tobytes())] != 0 for x in data.x[stamp])  # relabelled non-target images


def test_retune_leaves_its_model_alone_and_returns_a_tuned_copy():
    torch.manual_seed(0)
    model = resnet18(10, TEST_WIDTH)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = Split(torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (40,)))
    stamp = torch.zeros(40, dtype=torch.bool)
    stamp[:5] = True
    tuned, losses = retune(model, data, stamp, *badnets_trigger(), epochs=2, batch_size=16)
    assert len(losses) == 2 and all(loss > 0 for loss in losses)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not torch.equal(tuned.linear.weight, model.linear.weight)


@pytest.mark.parametrize("epochs", [1, 0])
def test_retune_run_reports_and_keeps_the_selected_student(teacher_dir, tmp_path, epochs):
    flags = defense_flags(teacher_dir, tmp_path / "plain", epochs) + ["--ratio_type", "fix"]
    plain = distri.main(flags)
    flags[flags.index("--output_dir") + 1] = str(tmp_path / "retuned")
    retuned = distri.main(flags + ["--retune", "--retune_images", "64", "--retune_epochs", "2"])
    saved = results_of(tmp_path / "retuned")
    for key in ("retune_acc", "retune_asr", "retune_asr_nontarget", "retune_ra"):
        assert 0 <= saved[key] <= 1 and saved[key] == retuned[key], key
    assert saved["retune_n_images"] == 64 and saved["retune_n_poisoned"] == 5 and len(saved["retune_ce"]) == 2
    assert "retune_acc" not in plain
    # selected.pkl is the selected student, not the re-tuned one: byte for byte the run's without --retune
    assert sha256(tmp_path / "retuned" / "selected.pkl") == sha256(tmp_path / "plain" / "selected.pkl")
    assert retuned["acc"] == plain["acc"] and retuned["asr"] == plain["asr"]


def test_retune_asks_for_no_more_images_than_the_training_split_has(teacher_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        distri.main(defense_flags(teacher_dir, tmp_path / "o") + ["--retune"])  # 1,000 of 192
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--retune_images 1000: the training split of --dataset has 192 images" in err
    assert not (tmp_path / "o").exists()


def test_clean_metrics_measure_in_eval_mode_and_leave_the_mode_alone():
    # a clean teacher's Acc is its eval-mode accuracy (as evaluate's): batch-norm's running statistics, not the
    # test batch's; found when adba.py --attack none wrote 0.6976 for a teacher distri.py measured at 0.7016
    bn = torch.nn.BatchNorm2d(2)
    bn.running_mean.copy_(torch.tensor([10.0, 0.0]))  # eval mode: channel 0 is x - 10 (negative), channel 1 is x
    model = torch.nn.Sequential(bn, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    x = torch.full((4, 2, 1, 1), 1.0)
    x[:2, 0] = 5.0  # train mode (batch statistics): channel 0 is +1 for images 0-1 and -1 for 2-3, channel 1 is 0
    y = torch.tensor([1, 1, 1, 1])
    model.train()
    assert clean_metrics(model, x, y) == {"acc": 1.0, "top_class_share": 1.0}
    assert model.training
    model.eval()
    assert clean_metrics(model, x, y)["acc"] == 1.0 and not model.training
    with torch.no_grad():
        model.train()
        assert (model(x).argmax(1) == y).float().mean().item() == 0.5  # what train mode would have said


def test_each_attack_carries_its_own_rules(tmp_path, capsys):
    """The attack-specific refusals live with the attack (its registered ``check``): ADBA keeps a constant lr and
    its own trigger; BadNets and Blended their own trigger; a clean teacher takes --trigger_dir."""
    from helper.attacks import ATTACKS
    assert ATTACKS["none"].check is None and ATTACKS["badnets"].check is ATTACKS["blended"].check
    for argv, said in ((["--attack", "adba", "--lr_schedule", "cosine"], "--lr_schedule cosine is for --attack badnets"),
                       (["--attack", "blended", "--trigger_dir", str(tmp_path)], "--trigger_dir is for --attack none")):
        with pytest.raises(SystemExit) as e:
            adba.main(argv + ["--dataset", "synthetic", "--width", "4", "--epochs", "1", "--device", "cpu",
                              "--output_dir", str(tmp_path / "out")])
        assert e.value.code == 2 and said in capsys.readouterr().err
        assert not (tmp_path / "out").exists()
