"""The registries: one list of defenses and one of attacks that every other place reads, and the examples of
docs/adding.md, copied into the package as a new file each, run through distri.py, the table, reproduce.py and
adba.py (a new defense or attack touches one new file and nothing else)."""
import importlib
import os
import re
import sys

import pytest
import torch

import adba
import distri
from helper.attacks import ATTACKS
from helper.attacks.options import get_attack_parser
from helper.defenses import DEFENSES
from helper.defenses.options import get_args_parser
from helper.jobs import reproduce
from tests import ROOT, read_json, read_text
from tests.conftest import fast_flags, write_teacher_dir

EXAMPLES = os.path.join(ROOT, "docs", "adding.md")


def example(n):
    """The n-th Python block of docs/adding.md (0: the defense, 1: the attack)."""
    return re.findall(r"```python\n(.*?)```", read_text(EXAMPLES), re.S)[n]


@pytest.fixture
def installed(request):
    """Copy an example into the package as ``helper/<group>/<module>.py``, import it; remove all of it afterwards."""
    made = []

    def install(group, module, code, registry, name):
        path = os.path.join(ROOT, "helper", group, f"{module}.py")
        # a file of that name is never overwritten, unless it is this example left by an interrupted test
        assert not os.path.exists(path) or read_text(path) == code, f"{path} exists"
        with open(path, "w") as f:
            f.write(code)
        made.append((path, f"helper.{group}.{module}", registry, name))
        return importlib.import_module(f"helper.{group}.{module}")
    yield install
    for path, module, registry, name in made:
        os.remove(path)
        sys.modules.pop(module, None)
        registry.pop(name, None)


def test_every_defense_is_registered_once_with_a_name_label_and_help():
    assert set(DEFENSES) == {"asd", "kd", "bcu", "nad", "finetune", "abd", "clp", "fineprune", "ibau", "sau", "nc",
                             "renofeation"}
    for name, cls in DEFENSES.items():
        assert cls.name == name and cls.label and cls.help
    assert len({cls.label for cls in DEFENSES.values()}) == len(DEFENSES)


def test_a_second_defense_under_a_taken_name_is_refused():
    from helper.defenses.base import Defense, register_defense
    with pytest.raises(ValueError, match="registered twice"):
        register_defense(type("Other", (Defense,), {"name": "kd", "label": "x", "help": "y"}))
    with pytest.raises(TypeError, match="sets name, label and help"):
        register_defense(type("Nameless", (Defense,), {}))


def test_help_description_and_readme_table_name_every_defense():
    text = get_args_parser().format_help()
    readme = read_text(os.path.join(ROOT, "README.md"))
    in_table = set(re.findall(r"^\| `(\w+)`(?: \(default\))? \|", readme, re.M))
    assert in_table == set(DEFENSES), "README's defenses table and the registry differ"
    for name in DEFENSES:
        assert re.search(rf"\b{name}\b", text), name
    assert "auto" in text


def test_every_attack_is_registered_and_is_adba_pys_choice():
    assert set(ATTACKS) == {"adba", "badnets", "blended", "none"}
    text = get_attack_parser().format_help()
    for name, attack in ATTACKS.items():
        assert attack.help and callable(attack.run) and f"{name}:" in re.sub(r"\s+", " ", text)


def test_the_example_defense_runs_through_distri_the_table_and_reproduce(tmp_path, installed, capsys):
    installed("defenses", "noisykd", example(0), DEFENSES, "noisykd")
    assert DEFENSES["noisykd"].label == "Noisy KD"
    teacher = write_teacher_dir(tmp_path / "teacher")
    text = get_args_parser(defense="noisykd").format_help()
    assert "noisykd" in text and "--noise_std" in text
    # distri.py: a run, its label in results.json; a bad value of its own flag refused in one line, no folder
    results = distri.main(fast_flags(teacher, tmp_path / "run", epochs=2) + ["--defense", "noisykd", "--noise_std",
                                                                              "0.1"])
    saved = read_json(tmp_path / "run" / "results.json")
    assert saved["defense"] == "noisykd" and saved["defense_label"] == "Noisy KD" and results["acc"] == saved["acc"]
    assert read_json(tmp_path / "run" / "args.json")["opt_lr"] == 0.01  # its own default
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        distri.main(fast_flags(teacher, tmp_path / "bad") + ["--defense", "noisykd", "--noise_std", "-1"])
    assert e.value.code == 2 and "--noise_std must be >= 0, not -1.0" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    # reproduce.py: its runs are subprocesses of distri.py, which find the new file themselves; the table names it
    out = tmp_path / "grid"
    entries = reproduce.main(["--read_dir", teacher, "--output_dir", str(out), "--preset", "smoke", "--defenses",
                              "noisykd", "--seeds", "0", "--epochs", "1", "--jobs", "1"])
    assert [(e["defense"], e["label"]) for e in entries] == [("noisykd", "Noisy KD")]
    assert read_text(out / "table.md").splitlines()[0] == "| | Noisy KD 64 |"


def test_the_example_attack_makes_a_teacher_through_adba_py(tmp_path, installed):
    module = installed("attacks", "checker", example(1), ATTACKS, "checker")
    out = tmp_path / "checker"
    adba.main(["--attack", "checker", "--dataset", "synthetic", "--synthetic_train", "64", "--synthetic_test", "32",
               "--width", "4", "--epochs", "1", "--batch_size", "32", "--device", "cpu", "--output_dir", str(out),
               "--no_progress"])
    pattern, mask = module.checker_trigger()
    assert torch.equal(torch.load(out / "pattern.pt", weights_only=True), pattern)
    assert torch.equal(torch.load(out / "mask.pt", weights_only=True), mask)
    assert read_json(out / "args.json")["poison_rate"] == 0.1  # its defaults: BackdoorBench's recipe
    assert pattern[0, :2, :2].tolist() == [[0.0, 1.0], [1.0, 0.0]] and mask.sum() == 16


def test_the_example_attacks_own_flag_is_listed_checked_and_read(tmp_path, installed, capsys):
    installed("attacks", "checker", example(1), ATTACKS, "checker")
    text = get_attack_parser().format_help()
    assert "Attack checker:" in text and "--checker_size" in text and "side of the checkerboard" in text
    argv = ["--attack", "checker", "--dataset", "synthetic", "--synthetic_train", "64", "--synthetic_test", "32",
            "--width", "4", "--epochs", "1", "--batch_size", "32", "--device", "cpu", "--no_progress"]
    with pytest.raises(SystemExit) as e:
        adba.main(argv + ["--checker_size", "0", "--output_dir", str(tmp_path / "bad")])
    assert e.value.code != 0 and not (tmp_path / "bad").exists()
    assert "--checker_size must be >= 1, not 0" in capsys.readouterr().err
    adba.main(argv + ["--checker_size", "2", "--output_dir", str(tmp_path / "two")])
    assert torch.load(tmp_path / "two" / "mask.pt", weights_only=True).sum() == 4


@pytest.mark.parametrize("argv,name,label", [(["--defense", "asd"], "asd", "ASD"),
                                             (["--defense", "asd", "--ratio_type", "fix"], "kd", "KD"),
                                             (["--defense", "kd"], "kd", "KD"), (["--defense", "clp"], "clp", "CLP"),
                                             (["--defense", "fineprune"], "fineprune", "Fine-Pruning"),
                                             (["--defense", "ibau"], "ibau", "I-BAU")])
def test_a_runs_name_and_label_come_from_its_defense(argv, name, label):
    """ASD's --ratio_type fix is named KD; the defenses that train through KD (clp, fineprune) keep their own."""
    args = distri.defense_parser(argv).parse_args(argv)
    assert (DEFENSES[args.defense].run_name(args), DEFENSES[args.defense].run_label(args)) == (name, label)


@pytest.mark.parametrize("name", ["kd", "clp", "fineprune"])
def test_kd_and_the_defenses_built_on_it_list_none_of_asds_flags(name, capsys):
    """ASD's flags shape ASL, which KD weighs 0: --defense kd (and clp, fineprune, which train through it) neither
    lists nor takes them, and runs with ASD's values of them and --ratio_type fix."""
    flags = get_args_parser(defense=name)._option_string_actions
    assert not {"--shift_fraction", "--ratio_type", "--eps", "--hook_layers"} & set(flags)
    assert "--shift_fraction" in get_args_parser(defense="asd")._option_string_actions
    args = distri.defense_parser(["--defense", name]).parse_args(["--defense", name])
    assert (args.ratio_type, args.shift, args.eps, args.new_loss_ratio) == ("fix", "all", 0.1, 0.0)
    with pytest.raises(SystemExit):
        distri.defense_parser(["--defense", name]).parse_args(["--defense", name, "--shift", "dormant"])
    assert "unrecognized arguments: --shift dormant" in capsys.readouterr().err


def test_each_defense_reads_its_own_flags_from_a_frozen_typed_config():
    """``config_of(args)``: one field per own Option (KD and the defenses built on it: ASD's too, at its values),
    frozen; the shared flags are not in it."""
    import dataclasses
    for name, cls in DEFENSES.items():
        args = distri.defense_parser(["--defense", name]).parse_args(["--defense", name])
        config = cls.config_of(args)
        fields = {f.name for f in dataclasses.fields(config)}
        assert fields == {o.dest for o in cls.config_fields()} and "epoch" not in fields and "opt_lr" not in fields
        assert all(getattr(config, f) == getattr(args, f) for f in fields)
    args = distri.defense_parser(["--defense", "ibau"]).parse_args(["--defense", "ibau", "--adv_radius", "4"])
    config = DEFENSES["ibau"].config_of(args)
    assert type(config).__name__ == "IBAUConfig" and config.ibau_radius == 4.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.ibau_radius = 1.0
    kd = DEFENSES["kd"].config_of(distri.defense_parser(["--defense", "kd"]).parse_args(["--defense", "kd"]))
    assert kd.ratio_type == "fix" and kd.shift == "all"


def test_the_shared_run_options_are_one_frozen_typed_object_with_no_defenses_flag():
    """``run_config_of(args)`` (a defense's ``self.args``): a field per flag no defense owns, typed, frozen; a defense
    reading its own flag (or another's) from it fails instead of reading the namespace (nc did, until this test)."""
    import dataclasses

    from helper.defenses.run_options import MODEL, OPTIMISATION, RETUNING, run_config_class, run_config_of
    fields = {f.name: f.type for f in dataclasses.fields(run_config_class())}
    assert {o.dest for o in MODEL + OPTIMISATION + RETUNING} <= set(fields)
    assert {"seed", "device", "read_dir", "dataset", "output_dir", "epoch", "defense"} <= set(fields)
    assert (fields["epoch"], fields["opt_lr"], fields["retune"], fields["lr_milestones"]) == (int, float, bool, list)
    owned = {o.dest for cls in DEFENSES.values() for o in cls.config_fields()}
    assert not owned & set(fields), owned & set(fields)
    argv = ["--defense", "ibau", "--epoch", "7", "--adv_radius", "4"]
    run = run_config_of(distri.defense_parser(argv).parse_args(argv))
    assert run.epoch == 7 and run.defense == "ibau" and not hasattr(run, "ibau_radius")
    # the shared parser RunConfig is made of is distri.py's parser without a defense's group
    assert set(fields) == {a.dest for a in get_args_parser(defense="kd")._actions if a.option_strings} - {"help"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.epoch = 1
