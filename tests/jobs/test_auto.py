"""``distri.py --defense auto``: the choice from the verdict, a folder without a trigger, the files it writes, its
errors."""
import json
import os

import pytest
import torch

import distri
from helper.data.teacher_dir import load_trigger
from helper.jobs import auto
from tests.conftest import fast_flags, write_teacher_dir

SCAN = ["--nc_images", "32", "--nc_passes", "2", "--nc_batch", "32", "--no_progress"]


def test_choice_follows_the_verdict():
    flags, why = auto.choose("no backdoor found", None)
    assert flags == ["--defense", "kd"] and "no backdoor" in why
    flags, why = auto.choose("backdoored", 7)
    common = ["--defense", "ibau", "--adv_search", "teacher", "--ibau_radius", "6", "--adv_every", "4",
              "--adv_mask_every", "2", "--adv_target", "7"]
    assert flags == common + ["--adv_term", "target"]  # train mode: class 7's probability alone is held
    assert "class 7" in why and "eval mode" not in why
    frozen, why = auto.choose("backdoored", 7, mismatch=auto.BN_MISMATCH_MAX + 0.1)
    # eval mode: the whole answer is held (the default --adv_term full), at weight 3
    assert frozen == common + ["--freeze_bn", "always", "--clip_grad", "1", "--adv_beta", "3"] and "eval mode" in why
    assert auto.choose("backdoored", 7, mismatch=auto.BN_MISMATCH_MAX)[0] == flags
    assert auto.choose("no backdoor found", None, mismatch=9.0)[0] == ["--defense", "kd"]  # a clean teacher: KD


def test_bn_mismatch_by_hand():
    """One batch-norm and a linear read-out: the mismatch is KL(softmax of the running-statistics answer ||
    softmax of the batch-statistics answer), image by image, averaged over the images of every batch; 0 where the
    running statistics are the batch's; the running statistics and the mode are left as they were."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.Flatten(), torch.nn.Linear(3 * 2 * 2, 4)).eval()
    bn = model[0]
    bn.running_mean.fill_(0.5)
    bn.running_var.fill_(2.0)
    x = torch.randn(6, 3, 2, 2) * 3 + 1
    by_hand = 0.0
    for xb in (x[:4], x[4:]):  # batches of 4: 4 images, then 2
        run = model[2](((xb - 0.5) / (2.0 + bn.eps) ** 0.5).flatten(1))
        mean, var = xb.mean((0, 2, 3), keepdim=True), xb.var((0, 2, 3), unbiased=False, keepdim=True)
        own = model[2](((xb - mean) / (var + bn.eps).sqrt()).flatten(1))
        p, q = torch.softmax(run, 1), torch.softmax(own, 1)
        by_hand += float((p * (p.log() - q.log())).sum().detach())
    got = auto.bn_mismatch(model, x, 4)
    assert got == pytest.approx(by_hand / 6, rel=1e-4) and got > 0.01
    assert not model.training and float(bn.running_var[0]) == 2.0
    bn.running_mean.copy_(x.mean((0, 2, 3)))
    bn.running_var.copy_(x.var((0, 2, 3), unbiased=False))
    assert auto.bn_mismatch(model, x, 6) == pytest.approx(0.0, abs=1e-6)


def test_split_takes_out_the_scan_flags_and_the_defense():
    own, rest = auto.split_argv(["--read_dir", "T", "--defense", "auto", "--nc_passes", "5", "--epoch", "3",
                                 "--nc_statistic", "mad", "--resume"])
    assert rest == ["--read_dir", "T", "--epoch", "3"]
    assert own.nc_passes == 5 and own.nc_statistic == "mad" and own.resume and own.nc_images == 500


def test_suspect_is_the_target_else_the_smallest_mask_trigger():
    scan = {"target": None, "families": {"mask": {"size": [5.0, 3.0, 9.0]}}}
    assert auto.suspect(scan) == 1
    assert auto.suspect({**scan, "target": 2}) == 2


def test_auto_on_a_folder_with_only_its_checkpoint(tmp_path, capsys):
    """Without a trigger the run is measured with the scan's inverted mask trigger of the suspected class, copied
    into scan-teacher/, towards that class; results.json says which defense ran, why, what both scans found and
    the teacher's batch-norm mismatch on the defense images."""
    teacher = write_teacher_dir(tmp_path / "teacher")
    for name in ("pattern.pt", "mask.pt"):
        os.remove(os.path.join(teacher, name))
    out = tmp_path / "auto"
    results = distri.main(fast_flags(teacher, out) + ["--defense", "auto"] + SCAN)
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    teacher_scan = json.loads((out / "scan-teacher" / "scan.json").read_text())
    assert saved["verdict"] == teacher_scan["verdict"] and saved["target"] == teacher_scan["target"]
    c = saved["suspect"]
    assert saved["bn_mismatch"] >= 0
    assert saved["choice"] == auto.choose(saved["verdict"], saved["target"], saved["bn_mismatch"])[0]
    assert saved["measured_with"] == f"the scan's inverted mask trigger of class {c}"
    run_args = json.loads((out / saved["choice"][1] / "args.json").read_text())
    assert run_args["target_label"] == c and run_args["trigger_dir"] == str(out / "scan-teacher")
    assert run_args["epoch"] == 2 and run_args["defense"] == saved["choice"][1]
    pattern, mask = load_trigger(str(out / "scan-teacher"))  # the inverted trigger, in a teacher folder's form
    params = torch.load(out / "scan-teacher" / "inverted.pt", weights_only=True)["mask"][c]
    assert torch.allclose(mask, (torch.tanh(params[0]) + 1) / 2) and torch.allclose(pattern, (torch.tanh(params[1]) + 1) / 2)
    # the teacher's inverted triggers reach the scan's goal on the teacher (a pass of 32 images: exact)
    assert all(saved["share_to_suspect"]["teacher"][n] >= 0.9 for n in teacher_scan["families"]
               if teacher_scan["families"][n]["reached"][c])
    assert json.loads((out / "scan-student" / "scan.json").read_text())["checkpoint"] == "selected.pkl"
    assert set(saved["index_of_suspect"]) == set(saved["share_to_suspect"]["student"]) == {"mask"}  # the default family
    # the suspected class's own test accuracy, the run's and its teacher's, carried into auto's results and line
    run = json.loads((out / saved["choice"][1] / "results.json").read_text())
    assert (saved["defense"]["target_acc"], saved["defense"]["teacher_target_acc"]) == \
        (run["target_acc"], run["teacher_target_acc"])
    printed = capsys.readouterr().out
    assert "holds no trigger" in printed
    assert (f"class {c} on the student: its own test images' Acc {run['target_acc']:.4f} "
            f"(teacher {run['teacher_target_acc']:.4f})") in printed


def test_a_backdoored_verdict_on_far_defense_images_trains_in_eval_mode(tmp_path, monkeypatch, capsys):
    """The choice reaches the run: a flagged class (here forced) with the teacher's batch-norm mismatch above the
    limit (here any) runs ibau's recipe with --freeze_bn always --clip_grad 1, and says why."""
    monkeypatch.setattr(auto, "verdict_of", lambda scan: ("backdoored", 3))
    monkeypatch.setattr(auto, "BN_MISMATCH_MAX", -1.0)
    teacher = write_teacher_dir(tmp_path / "teacher")
    out = tmp_path / "auto"
    saved = distri.main(fast_flags(teacher, out, epochs=1) + ["--defense", "auto"] + SCAN)
    assert saved["choice"][-8:] == ["--adv_target", "3", "--freeze_bn", "always", "--clip_grad", "1", "--adv_beta", "3"]
    assert f"differ by {saved['bn_mismatch']:.2f} nats" in saved["why"] and saved["bn_mismatch"] > 0
    run_args = json.loads((out / "ibau" / "args.json").read_text())
    assert (run_args["freeze_bn"], run_args["clip_grad"], run_args["adv_beta"], run_args["adv_target"]) == \
        ("always", 1.0, 3.0, 3)
    assert "train in eval mode above -1.0" in capsys.readouterr().out


def test_auto_with_a_clean_verdict_runs_plain_kd_and_measures_the_folder_trigger(tmp_path, monkeypatch, capsys):
    """A clean verdict runs plain KD, measured with the folder's own trigger; ``--resume`` of the finished auto
    run reuses both scans and the finished defense run and gives the same results."""
    teacher = write_teacher_dir(tmp_path / "teacher")
    monkeypatch.setattr(auto, "verdict_of", lambda scan: ("no backdoor found", None))
    out = tmp_path / "auto"
    flags = fast_flags(teacher, out) + ["--defense", "auto"] + SCAN
    results = distri.main(flags)
    assert results["choice"] == ["--defense", "kd"] and results["measured_with"] == "the folder's own trigger"
    assert (out / "kd" / "results.json").is_file() and not (out / "scan-teacher" / "mask.pt").exists()
    assert json.loads((out / "kd" / "args.json").read_text())["target_label"] == 0
    scanned = (out / "scan-student" / "scan.json").stat().st_mtime_ns
    capsys.readouterr()
    again = distri.main(flags + ["--resume"])
    said = capsys.readouterr().out
    assert said.count("a finished scan, reused") == 2 and "is a finished run" in said
    assert (out / "scan-student" / "scan.json").stat().st_mtime_ns == scanned
    assert json.loads(json.dumps(again)) == json.loads(json.dumps(results))


def test_auto_refuses_a_folder_without_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        distri.main(fast_flags(tmp_path / "nothing", tmp_path / "auto") + ["--defense", "auto"] + SCAN)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "checkpoint.pkl" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "auto").exists()
