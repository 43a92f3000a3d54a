"""reproduce.py: the smoke grid end to end, the table's numbers, skipping and resuming, submitit's local executor."""
import csv
import json
import os

import pytest

from helper.jobs import reproduce
from helper.jobs.grid import PRESETS, ROOT, build_grid, size_flags
from helper.report.table import cell_summary, markdown
from helper.run.runlog import read_jsonl
from tests import read_bytes, read_json, read_text, write_json_file
from tests.conftest import write_teacher_dir

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
            results = read_json(os.path.join(out, run, "results.json"))
            assert results["n_defense"] == 64 and results["defense"] == e["defense"]
        assert {"acc", "acc_mean", "acc_std", "asr", "asr_nontarget", "ra", "ra_std"} <= set(e)
    for name in ("table.md", "table.csv", "table.json", "tradeoff.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    assert read_bytes(os.path.join(out, "tradeoff.png"))[:8] == b"\x89PNG\r\n\x1a\n"
    md = read_text(os.path.join(out, "table.md"))
    assert md.splitlines()[0] == "| | KD 64 | ASD 64 |" and "| ASR non-target |" in md and "| RA |" in md
    table_csv = read_text(os.path.join(out, "table.csv")).splitlines()
    assert [row["defense"] for row in csv.DictReader(table_csv)] == ["kd", "asd"]
    assert read_json(os.path.join(out, "table.json")) == json.loads(json.dumps(entries))
    # --eval_every auto (5 on a CPU, decided by the run): epoch 0 of 2 is not evaluated, the last one is
    rows = read_jsonl(os.path.join(out, "kd-n64", "seed0", "log.jsonl"))
    assert "acc" not in rows[0] and "acc" in rows[1]


def test_a_second_run_skips_finished_runs_and_resumes_an_interrupted_one(smoke_grid, capsys):
    teacher, out, _ = smoke_grid
    finished = os.path.join(out, "kd-n64", "seed0", "results.json")
    before = read_text(finished), os.path.getmtime(finished)
    # make asd seed 1 an interrupted run: stopped results and one epoch of log
    folder = os.path.join(out, "asd-n64", "seed1")
    rows = read_jsonl(os.path.join(folder, "log.jsonl"))
    results = read_json(os.path.join(folder, "results.json"))
    write_json_file(os.path.join(folder, "results.json"), {**results, "stopped": "interrupted"})
    capsys.readouterr()
    reproduce.main(["--read_dir", teacher, "--output_dir", out, *SMOKE])
    text = capsys.readouterr().out
    assert "4 runs; 3 finished, 1 to resume, 0 to start" in text and "asd-n64 seed 1: acc" in text
    assert (read_text(finished), os.path.getmtime(finished)) == before  # not rewritten
    assert "resumed" in read_text(os.path.join(out, "logs", "asd-n64-seed1.log"))
    assert len(read_jsonl(os.path.join(folder, "log.jsonl"))) == len(rows)
    assert "stopped" not in read_json(os.path.join(folder, "results.json"))


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


# ---------------------------------------------------------------- the attack axis (--attacks)

TEACHER_FLAGS = ("--dataset synthetic --synthetic_train 128 --synthetic_test 64 --width 4 --epochs 1 --batch_size 64 "
                 "--eval_batch_size 64 --device cpu")
ATTACK_GRID = ["--preset", "smoke", "--defenses", "kd", "--seeds", "0", "--epochs", "1", "--jobs", "2",
               "--attack_flags", TEACHER_FLAGS, "--retune", "--retune_images", "32", "--retune_epochs", "1"]


@pytest.fixture(scope="module")
def attack_grid(tmp_path_factory):
    """badnets and none, both trained by reproduce.py; KD on each, one seed, re-tuned."""
    out = str(tmp_path_factory.mktemp("attacks") / "grid")
    summary = reproduce.main(["--attacks", "badnets", "none", "--output_dir", out, *ATTACK_GRID])
    return out, summary


def test_attacks_given_by_name_are_trained_once(attack_grid, capsys):
    out, _ = attack_grid
    for name in ("badnets", "none"):
        results = read_json(os.path.join(out, "teachers", name, "results.json"))
        assert results["attack"] == name and "stopped" not in results
        assert os.path.isfile(os.path.join(out, "logs", f"teacher-{name}.log"))
    assert os.path.isfile(os.path.join(out, "teachers", "badnets", "pattern.pt"))
    assert not os.path.exists(os.path.join(out, "teachers", "none", "pattern.pt"))
    teacher = os.path.join(out, "teachers", "badnets", "checkpoint.pkl")
    before = os.path.getmtime(teacher)
    capsys.readouterr()
    reproduce.main(["--attacks", "badnets", "none", "--output_dir", out, *ATTACK_GRID])
    text = capsys.readouterr().out
    assert "to train" not in text and "2 teachers x 1 cells x 1 seeds = 2 runs; 2 finished" in text
    assert os.path.getmtime(teacher) == before


def test_a_clean_teacher_is_measured_with_the_first_backdoored_teachers_trigger(attack_grid):
    out, summary = attack_grid
    badnets = read_json(os.path.join(out, "badnets", "kd-n64", "seed0", "args.json"))
    clean = read_json(os.path.join(out, "none", "kd-n64", "seed0", "args.json"))
    assert badnets["read_dir"] == os.path.join(out, "teachers", "badnets") and badnets["trigger_dir"] is None
    assert clean["read_dir"] == os.path.join(out, "teachers", "none")
    assert clean["trigger_dir"] == os.path.join(out, "teachers", "badnets")
    assert badnets["retune"] and clean["retune"] and clean["retune_images"] == 32
    assert [a["trigger_dir"] for a in summary["attacks"]] == [None, os.path.join(out, "teachers", "badnets")]


def test_each_attack_has_its_tables_and_the_summary_a_column_per_attack(attack_grid):
    out, summary = attack_grid
    for label in ("badnets", "none"):
        for name in ("table.md", "table_arms.md", "table.csv", "table.json", "tradeoff.png"):
            assert os.path.getsize(os.path.join(out, label, name)) > 0, (label, name)
        arms = read_text(os.path.join(out, label, "table_arms.md")).splitlines()
        assert "| re-tuned ASR |" in arms[0] and "—" not in arms[2].split("|")[8]  # the column and its number
    lines = read_text(os.path.join(out, "summary.md")).splitlines()
    assert lines[0] == "| | badnets | none |"
    teacher, kd = lines[2].split(" | "), lines[3].split(" | ")
    assert teacher[0] == "| teacher" and kd[0] == "| KD 64"
    for label, entry in zip(("badnets", "none"), kd[1:]):
        acc, asr, retuned_acc, retuned_asr = entry.strip(" |").split(" / ")
        cell = summary["rows"][0]["cells"][label]
        assert (acc, asr, retuned_acc, retuned_asr) == tuple(
            f"{cell[k]:.3f}" for k in ("acc", "asr", "retune_acc", "retune_asr"))
        run = read_json(os.path.join(out, label, "kd-n64", "seed0", "results.json"))
        assert cell["retune_asr"] == run["retune_asr"] and cell["retune_acc"] == run["retune_acc"]
        assert cell["acc"] == run["acc"]
    for a, entry in zip(summary["attacks"], teacher[1:]):
        run = read_json(os.path.join(out, a["label"], "kd-n64", "seed0", "results.json"))
        assert entry.strip(" |") == f"{run['teacher_acc']:.3f} / {run['teacher_asr']:.3f} / — / —"
    assert read_json(os.path.join(out, "summary.json")) == json.loads(json.dumps(summary))


def test_an_interrupted_teacher_is_resumed_with_the_same_flags_only(attack_grid, capsys):
    out, _ = attack_grid
    results = os.path.join(out, "teachers", "none", "results.json")
    write_json_file(results, {"stopped": "interrupted", "epochs_run": 1})
    changed = list(ATTACK_GRID)
    changed[changed.index("--attack_flags") + 1] = TEACHER_FLAGS.replace("--width 4", "--width 8")
    with pytest.raises(SystemExit) as e:
        reproduce.main(["--attacks", "badnets", "none", "--output_dir", out, *changed])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "--width 4 -> 8" in err
    reproduce.main(["--attacks", "badnets", "none", "--output_dir", out, *ATTACK_GRID])
    assert "teachers" in capsys.readouterr().out
    assert "resumed" in read_text(os.path.join(out, "logs", "teacher-none.log"))
    assert read_json(results)["attack"] == "none"


def test_the_summary_says_so_when_runs_had_no_retune():
    from helper.report.table import summary, summary_markdown
    entry = {"defense": "kd", "arm": "kd", "label": "KD", "n_defense": 5000, "n_runs": 3, "n_kept": 1, "acc": 0.5,
             "asr": 0.25}
    attacks = [{"label": "a", "attack": "adba", "teacher": "t", "trigger_dir": None, "teacher_acc": 0.6,
                "teacher_asr": 1.0, "n_runs": 3},
               {"label": "b", "attack": "badnets", "teacher": "u", "trigger_dir": None, "teacher_acc": None,
                "teacher_asr": None, "n_runs": 0}]
    md = summary_markdown(summary(attacks, {"a": [entry]}))
    assert "| teacher | 0.600 / 1.000 / — / — | — |" in md and "| KD 5,000 | 0.500 / 0.250 / — / — | — |" in md


def test_teacher_labels_from_names_folders_and_their_results(tmp_path):
    from tests.conftest import write_teacher_dir
    bad = write_teacher_dir(tmp_path / "bad-w8")
    write_json_file(os.path.join(bad, "results.json"), {"attack": "badnets"})
    old = write_teacher_dir(tmp_path / "old-adba")  # no results.json: its folder's name
    clean = write_teacher_dir(tmp_path / "clean")
    for name in ("pattern.pt", "mask.pt"):
        os.remove(os.path.join(clean, name))
    specs = reproduce.attack_specs([bad, old, f"mine={clean}", "blended"])
    assert [(t["label"], t["attack"], t["has_trigger"]) for t in specs] == [
        ("badnets", "badnets", True), ("old-adba", None, True), ("mine", None, False), ("blended", "blended", True)]
    assert [t["label"] for t in reproduce.attack_specs([bad, "badnets"])] == ["bad-w8", "badnets"]


@pytest.mark.parametrize("argv, message", [
    (["--attacks", "nosuch"], "--attacks nosuch: neither an attack name (adba, badnets, blended, none) nor a teacher folder"),
    (["--attacks", "none"], "no teacher has a trigger"),
    (["--attacks", "badnets", "badnets"], "two teachers labelled 'badnets'"),
    (["--attacks", "badnets", "--attack_flags", "--width x"], "adba.py --attack badnets: argument --width: invalid int"),
    (["--attacks", "badnets", "--attack_flags", "--epochs 0"], "--epochs must be >= 1, not 0"),
    (["--attacks", "adba", "--attack_flags", "--alpha 2"], "--alpha (also --alpha_backdoor) must be in [0, 1], not 2"),
    (["--attacks", "badnets", "--read_dir", "."], "not both"),
    ([], "--read_dir DIR (one teacher) or --attacks SPEC"),
])
def test_a_bad_attacks_value_is_one_clear_error(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        reproduce.main([*argv, "--preset", "smoke", "--output_dir", str(tmp_path / "g")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err
    assert not (tmp_path / "g").exists()


def test_a_teacher_to_train_is_an_adba_command_resumed_when_interrupted(tmp_path):
    from helper.jobs.grid import TeacherRun
    run = TeacherRun("blended", str(tmp_path / "t"), ["--epochs", "1", "--output_dir", str(tmp_path / "t")])
    assert run.state() == "new" and run.command()[1:4] == [os.path.join(ROOT, "adba.py"), "--attack", "blended"]
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "args.json").write_text("{}")
    assert run.state() == "interrupted" and run.command()[-1] == "--resume"


# ---------------------------------------------------------------- where the children run

def test_gpu_slots_are_the_parents_visible_gpus():
    from helper.jobs.grid import child_envs
    envs = child_envs(4, gpus=2, runs_per_gpu=2, parent={"CUDA_VISIBLE_DEVICES": "2,3"}, cores=16)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["2", "2", "3", "3"]  # never 0 and 1, outside the allocation
    assert [e["OMP_NUM_THREADS"] for e in envs] == ["4"] * 4  # 16 cores over 4 runs at once
    uuids = "GPU-8a1f0b2c-aaaa-bbbb-cccc-000000000001, MIG-5c3d-0001"
    envs = child_envs(3, gpus=2, runs_per_gpu=1, parent={"CUDA_VISIBLE_DEVICES": uuids}, cores=2)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["GPU-8a1f0b2c-aaaa-bbbb-cccc-000000000001", "MIG-5c3d-0001",
                                                       "GPU-8a1f0b2c-aaaa-bbbb-cccc-000000000001"]
    assert {e["OMP_NUM_THREADS"] for e in envs} == {"1"}  # at least one
    assert [e["CUDA_VISIBLE_DEVICES"] for e in child_envs(4, 2, 2, parent={}, cores=8)] == ["0", "0", "1", "1"]


def test_gpu_children_get_their_share_of_the_cores_cpu_children_get_one():
    """Issue 29: a GPU child gets cores // jobs threads even where the parent set OMP_NUM_THREADS itself (6 here:
    the parent's own share, not each child's)."""
    from helper.jobs.grid import child_envs
    parent = {"CUDA_VISIBLE_DEVICES": "5", "OMP_NUM_THREADS": "6", "KEEP": "x"}
    envs = child_envs(2, gpus=1, runs_per_gpu=2, parent=parent, cores=64)
    assert [(e["CUDA_VISIBLE_DEVICES"], e["OMP_NUM_THREADS"], e["KEEP"]) for e in envs] == [("5", "32", "x")] * 2
    envs = child_envs(2, gpus=0, parent=parent, cores=64)
    assert [e["OMP_NUM_THREADS"] for e in envs] == ["1", "1"] and envs[0]["CUDA_VISIBLE_DEVICES"] == "5"
    assert parent == {"CUDA_VISIBLE_DEVICES": "5", "OMP_NUM_THREADS": "6", "KEEP": "x"}  # the parent's is not changed


def test_visible_gpus_reads_cuda_visible_devices_as_cuda_does():
    from helper.jobs.grid import visible_gpus
    assert visible_gpus({}, 3) == ["0", "1", "2"] and visible_gpus({}) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "3,1"}) == ["3", "1"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "1,x,2"}) == ["1"]  # CUDA stops at the first invalid entry
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == [] and visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "4,5,6"}, 2) == ["4", "5"]


def test_run_local_puts_each_run_on_one_of_the_parents_gpus(tmp_path, monkeypatch):
    from helper.jobs import grid as G
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    seen = []
    monkeypatch.setattr(G, "run_one", lambda command, log, env=None: seen.append(
        (env["CUDA_VISIBLE_DEVICES"], env["OMP_NUM_THREADS"])) or (1, 0.0))
    monkeypatch.setattr(G, "cpu_cores", lambda: 8)
    runs = build_grid(str(tmp_path), [("kd", 64)], range(6))
    failures = G.run_local(runs, str(tmp_path), jobs=4, gpus=2, runs_per_gpu=2, out=lambda line: None)
    assert len(failures) == 6 and len(seen) == 6  # run_one's exit 1: every run "failed"
    assert {gpu for gpu, _ in seen} <= {"2", "3"} and {threads for _, threads in seen} == {"2"}


def _child_commands(monkeypatch, tmp_path, *flags):
    from tests.conftest import write_teacher_dir
    teacher = write_teacher_dir(tmp_path / "teacher")
    launched = []
    monkeypatch.setattr(reproduce, "launch", lambda todo, *a, **k: launched.extend(r.command() for r in todo) or [])
    reproduce.main(["--read_dir", teacher, "--output_dir", str(tmp_path / "g"), "--preset", "smoke", *flags])
    assert len(launched) == 4
    return launched


def test_eval_every_is_decided_by_each_run_unless_the_user_gives_a_number(monkeypatch, tmp_path):
    for command in _child_commands(monkeypatch, tmp_path):
        i = command.index("--eval_every")
        assert command[i + 1] == "auto" and command.count("--eval_every") == 1
    for command in _child_commands(monkeypatch, tmp_path, "--eval_every", "3"):
        assert command[command.index("--eval_every") + 1] == "3"


def test_a_bad_eval_every_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        reproduce.main(["--read_dir", str(tmp_path), "--preset", "smoke", "--eval_every", "0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--eval_every must be at least 1 (or auto), not 0" in err


def test_bf16_with_an_asd_cell_is_refused_before_any_run(tmp_path, capsys):
    """Issue 29: --amp bf16 passed through to a grid with an ASD cell stops the grid in one line naming the cell,
    before any folder; a grid of KD and BCU alone may run in bf16 (checked only up to its first run here)."""
    teacher = write_teacher_dir(tmp_path / "teacher")
    with pytest.raises(SystemExit) as e:
        reproduce.main(["--read_dir", teacher, "--preset", "smoke", "--output_dir", str(tmp_path / "g"), "--amp", "bf16"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "--amp bf16 with asd" in err
    assert not (tmp_path / "g").exists()
    from helper.jobs.reproduce import check_precision
    check_precision([("kd", 5000), ("bcu", 5000)], ["--amp", "bf16"])  # no error
    check_precision([("asd", 5000, "asd-kd", ["--ratio_type", "fix"])], ["--amp", "bf16"])  # ASL weight 0: no error
