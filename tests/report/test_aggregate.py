import json
import os

import pytest

from helper.report.aggregate import main, trimmed_summary


def _runs(accs, asrs):
    return [{"acc": a, "asr": s, "asr_nontarget": s / 2} for a, s in zip(accs, asrs)]


def test_seven_runs_drop_highest_and_lowest_acc():
    runs = _runs([0.5, 0.9, 0.1, 0.6, 0.7, 0.4, 0.8], [0.2, 1.0, 0.0, 0.3, 0.4, 0.1, 0.5])
    s = trimmed_summary(runs)
    assert s["n_runs"] == 7 and s["n_kept"] == 5
    assert s["acc"] == pytest.approx((0.4 + 0.5 + 0.6 + 0.7 + 0.8) / 5)
    assert s["asr"] == pytest.approx((0.1 + 0.2 + 0.3 + 0.4 + 0.5) / 5)  # ASR follows its run, not its own order
    assert s["asr_nontarget"] == pytest.approx(0.15)


def test_two_runs_keep_both():
    s = trimmed_summary(_runs([0.2, 0.4], [0.0, 1.0]))
    assert s["n_kept"] == 2 and s["acc"] == pytest.approx(0.3) and s["acc_std"] == pytest.approx(0.1)


def test_cli_reads_run_folders(tmp_path, capsys):
    for i, acc in enumerate([0.3, 0.5, 0.7]):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "results.json").write_text(json.dumps({"acc": acc, "asr": 0.1, "asr_nontarget": 0.0}))
    main([str(tmp_path / str(i)) for i in range(3)])
    assert "| 0.50 | 0.10 |" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "missing")])
    assert e.value.code == 2 and "results.json not found" in capsys.readouterr().err


def _folder(tmp_path, name, results):
    (tmp_path / name).mkdir()
    (tmp_path / name / "results.json").write_text(results if isinstance(results, str) else json.dumps(results))
    return str(tmp_path / name)


GOOD = {"acc": 0.5, "asr": 0.1, "asr_nontarget": 0.05, "ra": 0.4, "defense": "asd", "n_defense": 5000}


@pytest.mark.parametrize("bad,words", [
    ({**GOOD, "stopped": "interrupted"}, "the run stopped (interrupted)"),
    ({**GOOD, "stopped": "non-finite loss at epoch 3 (kd_loss)"}, "the run stopped (non-finite loss"),
    ({**GOOD, "defense": "kd"}, "key 'defense' is 'kd' but"),
    ({**GOOD, "n_defense": 50000}, "key 'n_defense' is 50000 but"),
    ({**GOOD, "acc": None}, "key 'acc' is None, not a number"),
    ("{not json", "is unreadable"),
])
def test_runs_that_must_not_be_averaged_are_refused_by_file_and_key(tmp_path, capsys, bad, words):
    good = _folder(tmp_path, "good", GOOD)
    bad_dir = _folder(tmp_path, "bad", bad)
    with pytest.raises(SystemExit) as e:
        main([good, bad_dir])
    err = capsys.readouterr().err
    assert e.value.code == 2 and words in err and os.path.join(bad_dir, "results.json") in err
    assert err.count("\n") == 1


def test_ra_is_summarised_when_every_run_has_it(tmp_path, capsys):
    runs = [_folder(tmp_path, str(i), {**GOOD, "acc": a, "ra": r}) for i, (a, r) in enumerate([(0.3, 0.1), (0.5, 0.2), (0.7, 0.9)])]
    s = main(runs)
    assert s["ra"] == pytest.approx(0.2) and "ra " in capsys.readouterr().out
