"""distri.py --config FILE: a JSON (or YAML) mapping of flags taken as defaults, the command line winning; every
bad file is one line and no folder."""
import json

import pytest

import distri
from helper.defenses.options import defense_parser
from helper.run.errors import UserError


def parse(argv):
    return defense_parser(argv).parse_args(argv)


def write(tmp_path, values, name="c.json"):
    path = tmp_path / name
    path.write_text(values if isinstance(values, str) else json.dumps(values))
    return str(path)


def test_a_config_sets_defaults_its_defense_included_and_the_command_line_wins(tmp_path):
    path = write(tmp_path, {"defense": "ibau", "ibau_radius": 6, "adv_every": 4, "epoch": "3", "lr_schedule": "step",
                            "lr_milestones": [2, 4]})
    args = parse(["--config", path, "--adv_every", "2"])
    assert args.defense == "ibau" and args.ibau_radius == 6 and args.adv_every == 2  # the command line wins
    assert args.epoch == 3 and isinstance(args.epoch, int)  # a string is converted by the flag's type
    assert args.lr_schedule == "step" and args.lr_milestones == [2, 4]
    assert args.opt_lr == 0.01  # the flags the file leaves are ibau's own defaults (its fine-tuning recipe)
    with pytest.raises(UserError, match="ibau_radius is not a flag of this command"):  # ibau's file, kd's flags
        parse(["--config", path, "--defense", "kd"])
    assert parse(["--config", write(tmp_path, {"defense": "ibau", "epoch": 2}, "e.json"), "--defense", "kd"]).defense == "kd"
    assert parse([]).defense == "asd" and parse([]).config is None


@pytest.mark.parametrize("content, message", [
    ({"nosuch": 1}, "nosuch is not a flag of this command"),
    ({"lr_schedule": "bogus"}, "lr_schedule must be one of none, cosine, step, not 'bogus'"),
    ({"epoch": "three"}, "epoch: invalid literal for int()"),
    ([1, 2], "must hold a mapping of flag names to values, not list"),
    ("{not json", "not valid JSON"),
    ({"config": "other.json"}, "config is not a flag of this command"),
])
def test_a_bad_config_is_one_line_and_no_folder(tmp_path, capsys, content, message):
    path = write(tmp_path, content)
    with pytest.raises(SystemExit) as e:
        distri.main(["--config", path, "--output_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and message in err and err.startswith(f"error: --config {path}")
    assert not (tmp_path / "run").exists()


def test_a_missing_config_and_a_value_out_of_range_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        distri.main(["--config", str(tmp_path / "none.json")])
    assert "no such file" in capsys.readouterr().err
    path = write(tmp_path, {"defense": "ibau", "ibau_radius": -1})
    with pytest.raises(SystemExit) as e:
        distri.main(["--config", path, "--output_dir", str(tmp_path / "run")])
    assert e.value.code == 2 and "--ibau_radius (also --adv_radius) must be > 0, not -1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_yaml_config(tmp_path):
    pytest.importorskip("yaml")
    path = write(tmp_path, "defense: nc\nnc_every: 5\nepoch: 2\n", "c.yaml")
    args = parse(["--config", path])
    assert (args.defense, args.nc_every, args.epoch) == ("nc", 5, 2)
