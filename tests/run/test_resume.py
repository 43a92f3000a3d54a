"""Runs that survive interruption: a graceful stop, --resume with the same results, atomic outputs."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import adba
import distri
import helper.run.interrupt as interrupt
from helper.run.runlog import atomic_write, read_jsonl, write_text
from helper.train.engine import fit, run_epoch
from tests import ROOT, read_json, write_json_file
from tests.conftest import fast_flags

TIMES = {"time_s", "train_time_s", "elapsed"}


def _no_times(obj):
    if isinstance(obj, dict):
        return {k: _no_times(v) for k, v in obj.items() if k not in TIMES}
    return obj


def _read(out):
    return (read_json(os.path.join(out, "results.json")),
            [_no_times(r) for r in read_jsonl(os.path.join(out, "log.jsonl"))])


def stop_at_step(monkeypatch, n):
    """Make the n-th step check of this process find a SIGINT, as if Ctrl-C had been pressed then."""
    calls = {"n": 0}
    real = interrupt.check

    def check():
        calls["n"] += 1
        if calls["n"] == n:
            interrupt.request(signal.SIGINT)
        real()
    monkeypatch.setattr(interrupt, "check", check)


def test_a_stop_request_ends_the_epoch_between_two_steps(tmp_path):
    interrupt.request(signal.SIGTERM)
    steps = []
    with pytest.raises(interrupt.Interrupted) as e:
        run_epoch(lambda v: steps.append(v) or {"a": v}, [((torch.tensor(1.0),), 1)] * 3)
    assert e.value.signum == signal.SIGTERM and steps == []
    interrupt.request(signal.SIGINT)
    result = fit(range(3), lambda e: run_epoch(lambda: {"kd_loss": torch.tensor(1.0)}, [((), 1)]), lambda e: {},
                 tmp_path / "log.jsonl", select_key="kd_loss", progress=False, out=None)
    assert result.stopped == "interrupted" and result.signum == signal.SIGINT and result.rows == []


@pytest.mark.parametrize("defense,extra", [("asd", []), ("nad", ["--nad_teacher_epochs", "2"]), ("ibau", []),
                                           ("renofeation", ["--reno_swa_start", "0.5"])])  # averages epochs 2-3
def test_stopped_and_resumed_run_equals_the_run_straight_through(teacher_dir, tmp_path, monkeypatch, capsys,
                                                                 defense, extra):
    flags = fast_flags(teacher_dir, tmp_path / "straight", epochs=4) + ["--defense", defense, "--no_progress",
                                                                       "--select_from", "1", *extra]
    distri.main(flags)
    straight = _read(tmp_path / "straight")

    out = str(tmp_path / "stopped")
    flags[flags.index("--output_dir") + 1] = out
    stop_at_step(monkeypatch, 7)  # 2 steps per epoch: during the 4th epoch (NAD: of its teacher's 2 + student's 4)
    with pytest.raises(SystemExit) as e:
        distri.main(flags)
    assert e.value.code == 128 + signal.SIGINT
    err = capsys.readouterr().err
    assert "interrupted by SIGINT" in err and f"--output_dir {out}" in err and err.strip().endswith("--resume")
    stopped = read_json(os.path.join(out, "results.json"))
    assert stopped["stopped"] == "interrupted" and stopped["epochs_run"] == (1 if defense == "nad" else 3)
    for f in ("checkpoint.pkl", "last.pt", "log.jsonl"):
        assert os.path.isfile(os.path.join(out, f)), f
    torch.load(os.path.join(out, "checkpoint.pkl"), weights_only=True)

    monkeypatch.undo()
    distri.main(flags + ["--resume"])
    resumed = _read(out)
    assert _no_times(resumed[0]) == _no_times(straight[0])  # the same results.json, times aside
    assert resumed[1] == straight[1]  # one line per epoch, none repeated, the same values


def test_resume_with_other_arguments_is_refused_and_a_finished_run_is_left_alone(teacher_dir, tmp_path, capsys):
    out = tmp_path / "r"
    flags = fast_flags(teacher_dir, out, epochs=1) + ["--no_progress"]
    distri.main(flags)
    before = (out / "results.json").read_text()
    with pytest.raises(SystemExit) as e:
        distri.main(flags + ["--resume", "--opt_lr", "0.5", "--seed", "3"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--opt_lr 0.001 -> 0.5" in err and "--seed 0 -> 3" in err
    distri.main(flags + ["--resume"])
    assert "is a finished run" in capsys.readouterr().out and (out / "results.json").read_text() == before
    with pytest.raises(SystemExit):
        distri.main(fast_flags(teacher_dir, tmp_path / "nowhere", epochs=1) + ["--resume"])
    assert "holds no args.json" in capsys.readouterr().err


def test_attack_stopped_and_resumed_equals_the_attack_straight_through(tmp_path, monkeypatch, capsys):
    flags = ["--dataset", "synthetic", "--synthetic_train", "128", "--synthetic_test", "64", "--width", "4",
             "--epochs", "2", "--batch_size", "64", "--device", "cpu", "--no_progress"]
    adba.main(flags + ["--output_dir", str(tmp_path / "straight")])
    straight = _read(tmp_path / "straight")
    out = str(tmp_path / "stopped")
    stop_at_step(monkeypatch, 6)  # 2 steps per epoch: in the first consolidation epoch
    with pytest.raises(SystemExit) as e:
        adba.main(flags + ["--output_dir", out])
    assert e.value.code == 130 and "--resume" in capsys.readouterr().err
    assert read_json(os.path.join(out, "results.json")) == {"stopped": "interrupted", "epochs_run": 2}
    monkeypatch.undo()
    adba.main(flags + ["--output_dir", out, "--resume"])
    resumed = _read(out)
    assert _no_times(resumed[0]) == _no_times(straight[0]) and resumed[1] == straight[1]


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("old")

    def half_then_fail(tmp):
        with open(tmp, "w") as f:
            f.write("new, but cut off")
        raise OSError("disk full")
    with pytest.raises(OSError):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["x.json"]
    write_text(path, "the table\n")  # the text helper through the same atomic rename
    assert path.read_text() == "the table\n" and os.listdir(tmp_path) == ["x.json"]


def _run_subprocess(teacher_dir, out, epochs):
    flags = fast_flags(teacher_dir, out, epochs=epochs) + ["--no_progress", "--ratio_type", "fix"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "distri.py", *flags], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, proc, timeout=120):
    end = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < end, "timed out"
        time.sleep(0.02)


def test_sigint_stops_a_real_run_and_resume_finishes_it(teacher_dir, tmp_path):
    out = tmp_path / "run"
    proc = _run_subprocess(teacher_dir, out, epochs=40)
    _wait_for(lambda: (out / "log.jsonl").exists() and len(read_jsonl(out / "log.jsonl")) >= 1, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "continue with: python distri.py" in err
    stopped = read_json(out / "results.json")
    assert stopped["stopped"] == "interrupted" and 1 <= stopped["epochs_run"] < 40
    assert torch.load(out / "selected.pkl", weights_only=True) and torch.load(out / "checkpoint.pkl", weights_only=True)
    flags = fast_flags(teacher_dir, out, epochs=40) + ["--no_progress", "--ratio_type", "fix", "--resume"]
    proc = subprocess.run([sys.executable, "distri.py", *flags], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert [r["epoch"] for r in read_jsonl(out / "log.jsonl")] == list(range(40))
    assert "stopped" not in read_json(out / "results.json")


def test_a_kill_during_the_final_writes_never_leaves_results_beside_a_partial_checkpoint(teacher_dir, tmp_path):
    """SIGKILL as soon as the final files start to appear: whatever is there is whole, and results.json only
    appears once everything else is written."""
    for attempt in range(3):
        out = tmp_path / f"kill{attempt}"
        proc = _run_subprocess(teacher_dir, out, epochs=2)
        _wait_for(lambda: out.exists() and any(n in os.listdir(out) for n in
                                               ("checkpoint.pkl", ".checkpoint.pkl.tmp", "selected.pkl")), proc)
        time.sleep(0.01 * attempt)
        proc.kill()
        proc.communicate()
        names = os.listdir(out)
        for name in ("checkpoint.pkl", "selected.pkl"):
            if name in names:
                torch.load(out / name, weights_only=True)  # whole, never truncated
        if "results.json" in names:
            assert {"checkpoint.pkl", "selected.pkl", "curves.png"} <= set(names)
            read_json(out / "results.json")


def test_args_json_holds_every_argument_as_given(teacher_dir, tmp_path):
    """--resume compares args.json with the command line, so what the run adds to args.json must never replace
    an argument's own value (the run's device and precision are ``device_used`` and ``precision``)."""
    out = tmp_path / "r"
    flags = fast_flags(teacher_dir, out, epochs=1) + ["--no_progress"]
    distri.main(flags)
    saved = read_json(out / "args.json")
    args = distri.defense_parser(flags).parse_args(flags)
    assert {k: saved[k] for k in vars(args)} == json.loads(json.dumps(vars(args)))
    assert saved["amp"] == "auto" and saved["device_used"] == "cpu" and saved["precision"] == "fp32"


def test_a_flag_newer_than_the_run_resumes_at_its_default_only():
    """A package update that adds a flag must not strand runs in progress: absent from args.json + at its
    default counts as the same; absent + another value, or present + another value, is a difference."""
    import argparse

    from helper.run.resume import differing_flags
    saved = {"opt_lr": 0.001, "seed": 0}
    now = argparse.Namespace(opt_lr=0.001, seed=0, shift="all")
    assert differing_flags(saved, now, {"shift": "all"}) == []
    assert differing_flags(saved, now) == ["--shift None -> 'all'"]  # without defaults: strict
    now.shift = "dormant"
    assert differing_flags(saved, now, {"shift": "all"}) == ["--shift None -> 'dormant'"]
    now.shift, now.seed = "all", 3
    assert differing_flags(saved, now, {"shift": "all", "seed": 0}) == ["--seed 0 -> 3"]


# ---------------------------------------------------------------- devices: RNG states and resuming elsewhere

def _no_cuda(monkeypatch):
    """A machine that claims a GPU, whose CUDA RNG calls fail: rng_states on the CPU must not call them."""
    def refuse(*args, **kwargs):
        raise AssertionError("torch.cuda touched by a CPU run")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in ("get_rng_state_all", "get_rng_state", "set_rng_state_all", "set_rng_state"):
        monkeypatch.setattr(torch.cuda, name, refuse)


def test_rng_states_of_a_cpu_run_leave_torch_cuda_alone(monkeypatch):
    from helper.run.resume import rng_states, set_rng_states
    _no_cuda(monkeypatch)
    generator = torch.Generator().manual_seed(3)
    states = rng_states(generator, torch.device("cpu"))
    assert set(states) == {"device", "generator", "torch"} and states["device"] == "cpu"
    expected = torch.rand(4, generator=generator)
    other = torch.Generator().manual_seed(9)
    set_rng_states(other, states, torch.device("cpu"))
    assert torch.equal(torch.rand(4, generator=other), expected)
    # a last.pt of an older version: no "device", every GPU's state as "cuda" (saved on a CPU run on a GPU machine)
    set_rng_states(other, {"generator": states["generator"], "torch": states["torch"], "cuda": [torch.zeros(16)]})
    assert torch.equal(torch.rand(4, generator=other), expected)


@pytest.mark.parametrize("states", [
    {"device": "cuda", "generator": torch.zeros(16, dtype=torch.uint8),
     "cuda_device": torch.zeros(16, dtype=torch.uint8)},
    {"generator": torch.zeros(16, dtype=torch.uint8), "cuda": [torch.zeros(16, dtype=torch.uint8)]},  # older last.pt
], ids=["device-field", "older-cuda-sized-state"])
def test_states_of_another_device_type_are_one_clear_error(states):
    from helper.run.errors import UserError
    from helper.run.resume import check_rng_device, set_rng_states
    states = {**states, "torch": torch.get_rng_state()}
    with pytest.raises(UserError, match="started on cuda and would continue on cpu; a run resumes on the device type "
                                        "it started on"):
        set_rng_states(torch.Generator(), states, torch.device("cpu"))
    cpu_states = {"device": "cpu", "generator": torch.Generator().get_state(), "torch": torch.get_rng_state()}
    with pytest.raises(UserError, match="started on cpu and would continue on cuda"):
        check_rng_device(cpu_states, torch.device("cuda"))  # no GPU needed: it is refused before anything is restored


def test_a_run_resumed_on_another_device_type_is_refused_and_its_folder_left_as_it_was(teacher_dir, tmp_path, capsys):
    """A last.pt whose generator came from a GPU (faked: a CUDA-sized state) resumed on the CPU: one line naming
    both device types, exit 2, nothing in the folder changed (the stopped results.json, the log, last.pt)."""
    out = tmp_path / "r"
    flags = fast_flags(teacher_dir, out, epochs=2) + ["--no_progress", "--ratio_type", "fix", "--eval_every", "auto",
                                                     "--deterministic"]
    try:
        distri.main(flags)
    finally:
        torch.use_deterministic_algorithms(False)
    saved = read_json(out / "args.json")
    assert saved["eval_every"] == "auto" and saved["eval_every_effective"] == 5 and saved["deterministic"] is True
    rows = read_jsonl(out / "log.jsonl")
    assert "acc" not in rows[0] and "acc" in rows[1]  # auto on the CPU: every 5th epoch and the last
    results = read_json(out / "results.json")
    write_json_file(out / "results.json", {**results, "stopped": "interrupted"})
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["rng"]["device"] == "cpu" and "cuda" not in last["rng"] and "cuda_device" not in last["rng"]
    del last["rng"]["device"]  # as an older last.pt, told by the generator state's size
    last["rng"]["generator"] = torch.zeros(16, dtype=torch.uint8)
    torch.save(last, out / "last.pt")
    before = {name: (out / name).read_bytes() for name in ("results.json", "log.jsonl", "last.pt", "args.json")}
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as e:
            distri.main(flags + ["--resume"])
    finally:
        torch.use_deterministic_algorithms(False)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert f"--resume: the run in {out} started on cuda and would continue on cpu" in err
    assert "resume it on a machine with a CUDA GPU" in err
    assert {name: (out / name).read_bytes() for name in before} == before


def test_eval_every_auto_resumes_a_run_started_with_the_number_it_amounts_to():
    """A grid interrupted before reproduce.py passed --eval_every auto has runs with 5 (on a CPU) in args.json."""
    import argparse

    from helper.run.resume import differing_flags
    saved = {"eval_every": 5, "seed": 0}
    now = argparse.Namespace(eval_every="auto", seed=0)
    assert differing_flags(saved, now, resolved={"eval_every": 5}) == []
    # on a GPU auto is 1: not the same
    assert differing_flags(saved, now, resolved={"eval_every": 1}) == ["--eval_every 5 -> 'auto'"]
    assert differing_flags(saved, now) == ["--eval_every 5 -> 'auto'"]
    assert differing_flags({"eval_every": "auto", "seed": 0}, now, resolved={"eval_every": 5}) == []


def test_a_run_resumed_before_its_first_epoch_records_the_device_it_ran_on(teacher_dir, tmp_path):
    """Issue 29: a run stopped before any last.pt and resumed (here: on the CPU, after it was opened on a GPU)
    rewrites args.json's environment; the arguments themselves stay as given."""
    out = tmp_path / "r"
    flags = fast_flags(teacher_dir, out, epochs=1) + ["--no_progress"]
    args = distri.defense_parser(flags).parse_args(flags)
    record = {**json.loads(json.dumps(vars(args))), "device_used": "cuda:0", "precision": "bfloat16"}
    os.makedirs(out)
    with open(out / "args.json", "w") as f:
        json.dump(record, f)
    distri.main(flags + ["--resume"])
    saved = read_json(out / "args.json")
    assert saved["device_used"] == "cpu" and saved["precision"] == "fp32"
    given = {k: v for k, v in json.loads(json.dumps(vars(args))).items() if k != "resume"}
    assert {k: saved[k] for k in given} == given and saved["resume"] is True
    assert (out / "results.json").is_file()
