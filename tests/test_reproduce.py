"""reproduce.py: the smoke grid end to end, the table's numbers, skipping and resuming, submitit's local executor."""
import csv
import json
import os
import shutil

import pytest

import reproduce
from helper.grid import PRESETS, build_grid, size_flags
from helper.runlog import read_jsonl
from helper.table import cell_summary, markdown

SMOKE = ["--preset", "smoke", "--jobs", "2"]


@pytest.fixture(scope="module")
def smoke_grid(tmp_path_factory):
    from tests.conftest import write_teacher_dir
    root = tmp_path_factory.mktemp("grid")
    teacher = write_teacher_dir(root / "teacher")
    out = str(root / "grid")
    entries = reproduce.main(["--read_dir", teacher, "--output_dir", out, *SMOKE])
    return teacher, out, entries


def test_smoke_preset_writes_every_run_and_the_table(smoke_grid):
    teacher, out, entries = smoke_grid
    assert [(e["defense"], e["n_defense"], e["n_runs"]) for e in entries] == [("kd", 64, 2), ("asd", 64, 2)]
    for e in entries:
        assert e["runs"] == [f"{e['defense']}-n64/seed0", f"{e['defense']}-n64/seed1"]
        for run in e["runs"]:
            results = json.load(open(os.path.join(out, run, "results.json")))
            assert results["n_defense"] == 64 and results["defense"] == e["defense"]
        assert {"acc", "acc_mean", "acc_std", "asr", "asr_nontarget", "ra", "ra_std"} <= set(e)
    for name in ("table.md", "table.csv", "table.json", "tradeoff.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    assert open(os.path.join(out, "tradeoff.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    md = open(os.path.join(out, "table.md")).read()
    assert md.splitlines()[0] == "| | KD 64 | ASD 64 |" and "| ASR non-target |" in md and "| RA |" in md
    assert [row["defense"] for row in csv.DictReader(open(os.path.join(out, "table.csv")))] == ["kd", "asd"]
    assert json.load(open(os.path.join(out, "table.json"))) == json.loads(json.dumps(entries))
    # --eval_every (5 on a CPU): epoch 0 of 2 is not evaluated, the last one is; the result is a full evaluation
    rows = read_jsonl(os.path.join(out, "kd-n64", "seed0", "log.jsonl"))
    assert "acc" not in rows[0] and "acc" in rows[1]


def test_a_second_run_skips_finished_runs_and_resumes_an_interrupted_one(smoke_grid, capsys):
    teacher, out, _ = smoke_grid
    finished = os.path.join(out, "kd-n64", "seed0", "results.json")
    before = open(finished).read(), os.path.getmtime(finished)
    # make asd seed 1 an interrupted run: stopped results and one epoch of log
    folder = os.path.join(out, "asd-n64", "seed1")
    rows = read_jsonl(os.path.join(folder, "log.jsonl"))
    results = json.load(open(os.path.join(folder, "results.json")))
    json.dump({**results, "stopped": "interrupted"}, open(os.path.join(folder, "results.json"), "w"))
    capsys.readouterr()
    reproduce.main(["--read_dir", teacher, "--output_dir", out, *SMOKE])
    text = capsys.readouterr().out
    assert "4 runs; 3 finished, 1 to resume, 0 to start" in text and "asd-n64 seed 1: acc" in text
    assert (open(finished).read(), os.path.getmtime(finished)) == before  # not rewritten
    assert "resumed" in open(os.path.join(out, "logs", "asd-n64-seed1.log")).read()
    assert len(read_jsonl(os.path.join(folder, "log.jsonl"))) == len(rows)
    assert "stopped" not in json.load(open(os.path.join(folder, "results.json")))


def test_submitit_local_executor_runs_the_same_grid(smoke_grid, tmp_path):
    teacher, _, _ = smoke_grid
    out = str(tmp_path / "sub")
    entries = reproduce.main(["--read_dir", teacher, "--output_dir", out, "--preset", "smoke", "--defenses", "kd",
                              "--seeds", "0", "--launcher", "submitit-local"])
    assert [(e["defense"], e["n_runs"]) for e in entries] == [("kd", 1)]
    assert os.path.isdir(os.path.join(out, "submitit"))


def test_trimmed_mean_of_a_cell_by_hand(tmp_path):
    folders = []
    for i, (acc, asr) in enumerate([(0.5, 0.2), (0.9, 1.0), (0.1, 0.0), (0.6, 0.3), (0.7, 0.4)]):
        f = tmp_path / str(i)
        f.mkdir()
        (f / "results.json").write_text(json.dumps({"acc": acc, "asr": asr, "asr_nontarget": asr, "ra": 1 - asr,
                                                    "defense": "kd", "n_defense": 5000}))
        folders.append(str(f))
    e = cell_summary("kd", 5000, folders, str(tmp_path))
    assert e["n_runs"] == 5 and e["n_kept"] == 3
    assert e["acc"] == pytest.approx((0.5 + 0.6 + 0.7) / 3) and e["asr"] == pytest.approx((0.2 + 0.3 + 0.4) / 3)
    # over all 5 runs: mean 0.56, squared deviations 0.0036 + 0.1156 + 0.2116 + 0.0016 + 0.0196 = 0.352
    assert e["acc_mean"] == pytest.approx(0.56) and e["acc_std"] == pytest.approx((0.352 / 5) ** 0.5)
    assert e["runs"] == ["0", "1", "2", "3", "4"]
    assert "| Acc | 0.600 ± 0.265 |" in markdown([e])


def test_grid_commands():
    assert size_flags(5000) == ["--defense_size", "5000"] and size_flags(60000)[0] == "--finetune_extend"
    runs = build_grid("out", PRESETS["paper"]["cells"], range(7))
    assert len(runs) == 49 and runs[0].folder == os.path.join("out", "kd-n5000", "seed0")
    assert "--epoch" not in runs[0].argv  # the paper preset keeps each defense's own epochs (300 for KD and ASD)
