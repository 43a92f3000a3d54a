"""The GPU check (helper/jobs/gpucheck.py) in its toy mode on the CPU: every step runs and reports, a resumed
deterministic run equals the straight one, and a spent budget skips steps with a reason instead of running them."""

import pytest

from helper.jobs import gpucheck
from tests import read_json


@pytest.fixture(scope="module")
def toy_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpucheck")
    # a budget no machine exhausts (no assertion depends on speed); the eager backend traces with dynamo
    # without building kernels, which takes the inductor tens of seconds on a CPU
    report = gpucheck.main(["--out", str(out), "--compile_backend", "eager", "--budget_s", "36000"])
    return out, report


def test_every_step_runs_in_toy_mode_and_writes_its_figures(toy_report):
    out, report = toy_report
    assert report["mode"] == "toy" and list(report["steps"]) == list(gpucheck.STEPS)
    assert {name: step["status"] for name, step in report["steps"].items()} == {s: "ok" for s in gpucheck.STEPS}
    saved = read_json(out / "gpucheck.json")
    assert saved["steps"].keys() == report["steps"].keys()
    md = (out / "gpucheck.md").read_text()
    assert all(f"## {name}: ok" in md for name in gpucheck.STEPS)
    steps = report["steps"]
    assert steps["compile"]["kd_loss"]["max_abs_diff"] < 1e-5 and steps["compile"]["asl_terms"]["max_abs_diff"] < 1e-5
    assert set(steps["precision"]["asl_0.02"]) == {"fp32", "bf16"} and steps["precision"]["kd_0.1"]["fp32"] > 0.99
    assert steps["bench"]["kd_img_s"] > 0 and "ibau" in steps["bench"]["defenses"]
    assert set(steps["runs_per_gpu"]["total_img_s"]) == {"1", "2"} and steps["runs_per_gpu"]["best"] in ("1", "2")
    assert {"kd", "asd", "ibau"} <= set(steps["cell"]) and 0 <= steps["cell"]["ibau"]["acc"] <= 1
    assert report["teacher"]["made_by"] == "adba.py"


def test_a_deterministic_run_stopped_and_resumed_equals_the_straight_one(toy_report):
    step = toy_report[1]["steps"]["resume"]
    assert step["identical_results"] and step["identical_log"] and step["differing_keys"] == []


def test_a_spent_budget_skips_every_step_and_says_why(tmp_path):
    args = gpucheck.get_args_parser().parse_args(["--out", str(tmp_path), "--budget_s", "1"])
    c = gpucheck.Check(args)
    c.deadline = c.start - 1  # nothing left
    report = gpucheck.run_steps(c, gpucheck.STEPS, out=lambda *a, **k: None)
    assert all(s["status"] == "skipped" and "needed to start" in s["why"] for s in report["steps"].values())
    assert "## cell: skipped" in (tmp_path / "gpucheck.md").read_text()


def test_a_failing_step_is_reported_and_the_next_still_run(tmp_path, monkeypatch):
    args = gpucheck.get_args_parser().parse_args(["--out", str(tmp_path), "--budget_s", "600"])
    c = gpucheck.Check(args)

    def broken(c):
        raise RuntimeError("no kernel image is available")
    monkeypatch.setitem(gpucheck.STEP_FNS, "compile", broken)
    monkeypatch.setitem(gpucheck.STEP_FNS, "precision", lambda c: {"figure": 1})
    report = gpucheck.run_steps(c, ["compile", "precision"], out=lambda *a, **k: None)
    assert report["steps"]["compile"]["status"] == "failed" and "no kernel image" in report["steps"]["compile"]["why"]
    assert report["steps"]["precision"]["status"] == "ok" and report["steps"]["precision"]["figure"] == 1


def test_bad_budget_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        gpucheck.main(["--budget_s", "0"])
    assert e.value.code == 2 and "--budget_s" in capsys.readouterr().err
