"""The --help of every entry point: a description, and every flag with help text and (where it has one) its default."""
import argparse
import os
import subprocess
import sys

import pytest

import scan
from helper.attacks.options import get_attack_parser
from helper.defenses import DEFENSES
from helper.defenses.options import get_args_parser
from helper.jobs import bench, reproduce
from tests import ROOT

PARSERS = {**{f"distri.py --defense {d}": lambda d=d: get_args_parser(defense=d) for d in DEFENSES},
           "adba.py": get_attack_parser, "bench.py": bench.get_args_parser, "reproduce.py": reproduce.get_parser,
           "scan.py": scan.scan_parser}


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_every_flag_has_help_and_the_parser_a_description(name):
    parser = PARSERS[name]()
    assert parser.description and parser.prog in ("pytest", "__main__.py", "-c", os.path.basename(sys.argv[0]))
    missing = [a.option_strings for a in parser._actions if not a.help or a.help == argparse.SUPPRESS]
    assert missing == []
    assert isinstance(parser.formatter_class, type) and issubclass(parser.formatter_class,
                                                                   argparse.ArgumentDefaultsHelpFormatter)


@pytest.mark.parametrize("script", ["adba.py", "distri.py", "bench.py", "reproduce.py", "scan.py"])
def test_help_runs_and_names_the_program(script):
    proc = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith(f"usage: {script} ")


def test_distri_takes_epochs_as_well_as_epoch():
    assert get_args_parser().parse_args(["--epochs", "7"]).epoch == 7
    assert get_args_parser().parse_args(["--epoch", "7"]).epoch == 7


def test_reproduce_refuses_a_folder_without_a_teacher(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        reproduce.main(["--read_dir", str(tmp_path), "--preset", "smoke", "--output_dir", str(tmp_path / "g")])
    assert e.value.code == 2 and "no checkpoint.pkl there" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()


def test_fp16_is_refused_in_one_line(capsys):
    """fp16 autocast without a GradScaler lets small gradients underflow to 0; the choice is gone (bf16 needs none)."""
    import distri
    with pytest.raises(SystemExit) as e:
        distri.main(["--amp", "fp16"])
    assert e.value.code == 2 and "invalid choice: 'fp16'" in capsys.readouterr().err
