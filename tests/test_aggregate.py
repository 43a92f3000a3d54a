import json

import pytest

from helper.aggregate import main, trimmed_summary


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
