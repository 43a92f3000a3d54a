"""A tiny version of ``python distri.py --demo`` (the real one takes minutes and is not run here)."""
import os

import distri
import helper.jobs.demo as demo
from tests import read_json


def test_tiny_demo_runs_every_step_and_writes_the_table(tmp_path, monkeypatch, capsys):
    tiny = {"width": 4, "n_train": 128, "n_test": 64, "n_defense": 64, "attack_epochs": 1, "consolidation_epochs": 1,
            "distill_epochs": 2, "select_from": 1}
    monkeypatch.setattr(demo, "DEMO", {**demo.DEMO, **tiny})
    out = tmp_path / "demo"
    result = distri.main(["--demo", "--output_dir", str(out), "--device", "cpu", "--eval_batch_size", "64"])
    for name in ("demo_results.json", "demo.png", "teacher/checkpoint.pkl", "teacher/results.json",
                 "clean/checkpoint.pkl", "clean/results.json",
                 *(f"{folder}/{f}" for _, folder, _ in demo.STUDENTS for f in ("results.json", "curves.png"))):
        assert os.path.isfile(out / name), name
    saved = read_json(out / "demo_results.json")
    auto = [k for k in saved["table"] if k.startswith("auto (")]
    assert set(saved["table"]) == {"ADBA teacher", demo.FLOOR, *(f"{name} student" for name, _, _ in demo.STUDENTS),
                                   *auto}
    # the floor: a clean teacher (--attack none) measured with the ADBA teacher's trigger
    clean_args = read_json(out / "clean" / "args.json")
    assert (clean_args["attack"], clean_args["trigger_dir"]) == ("none", str(out / "teacher"))
    clean = read_json(out / "clean" / "results.json")
    assert clean["attack"] == "none" and not os.path.exists(out / "clean" / "pattern.pt")  # trained clean
    assert saved["table"][demo.FLOOR]["asr_nontarget"] == clean["asr_nontarget"]
    # the last step: auto on a folder holding the teacher's checkpoint alone, measured with the attack's trigger
    assert len(auto) == 1 and os.listdir(out / "handed") == ["checkpoint.pkl"]
    row = saved["table"][auto[0]]
    assert auto[0] == f"auto ({row['choice'][1]}) student" and row["choice"][1] in ("kd", "ibau")
    assert (row["choice"][1] == "ibau") == (row["verdict"] == "backdoored")
    assert read_json(out / "auto" / "results.json")["measured_with"] == f"--trigger_dir {out / 'teacher'}"
    assert os.path.isfile(out / "auto" / row["choice"][1] / "results.json")
    assert [name for name, _, _ in demo.STUDENTS][:2] == ["KD", "ASD"] and len(demo.STUDENTS) == 3
    for row in saved["table"].values():
        assert {"acc", "asr", "asr_nontarget"} <= set(row) and 0 <= row["target_acc"] <= 1
    assert saved["table"]["ADBA teacher"]["target_acc"] == read_json(out / "teacher" / "results.json")["target_acc"]
    assert saved["sizes"]["n_train"] == 128 and result["table"] == saved["table"]
    assert read_json(out / "asd" / "args.json")["ratio_type"] == "scheduler"
    assert read_json(out / "kd" / "args.json")["ratio_type"] == "fix"
    text = capsys.readouterr().out
    assert "ASR non-target" in text and all(f"{name} student" in text for name, _, _ in demo.STUDENTS)
    # KD and ASD at the demo's lr, the unlearning defense with its own defaults
    assert read_json(out / "kd" / "args.json")["opt_lr"] == demo.DEMO["distill_lr"]
    third = read_json(out / demo.STUDENTS[2][1] / "args.json")
    assert third["defense"] == demo.STUDENTS[2][2][1] and third["opt_lr"] == 0.01


def test_format_table():
    text = demo.format_table([("a", {"acc": 0.5, "asr": 0.25, "asr_nontarget": 0.125}),
                              ("b", {"acc": 0.5, "asr": 0.25, "asr_nontarget": 0.125, "target_acc": 0.375})])
    header, a, b = text.splitlines()
    assert header.split() == ["model", "Acc", "ASR", "ASR", "non-target", "target-class", "Acc"]
    assert a.split() == ["a", "0.5000", "0.2500", "0.1250", "-"]
    assert b.split() == ["b", "0.5000", "0.2500", "0.1250", "0.3750"] and len(a) == len(b) == len(header)
