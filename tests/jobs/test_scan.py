"""scan.py: a planted backdoor is flagged and its clean twin is not; the trigger files are opened only after the
verdict is written; what the scan writes."""
import json
import os

import pytest
import torch

import scan
from helper.jobs.scan import margin, scan_model, verdict
from helper.train.perturb import MaskPattern, Universal, anomaly_index
from tests.conftest import write_teacher_dir


class Bands(torch.nn.Module):
    """A toy classifier of 32x32 images: class c's logit is k_c x the mean of rows 3c..3c+2 (all channels), k_c
    from 16 to 24, so every class needs about the same change of its own band. ``backdoor``: class 0 also gets
    40 x sigmoid(10 (mean of the 2x6 patch at the bottom right - 0.6)), a planted trigger direction that a
    white patch (12 pixels, below every band) fires (0.3 on the clean images)."""

    def __init__(self, backdoor):
        super().__init__()
        self.backdoor = backdoor
        self.k = torch.linspace(16, 24, 10)

    def forward(self, x):
        logits = torch.stack([x[:, :, 3 * c:3 * c + 3].mean((1, 2, 3)) for c in range(10)], 1) * self.k
        if self.backdoor:
            logits[:, 0] = logits[:, 0] + 40 * torch.sigmoid(10 * (x[:, :, 30:, 26:].mean((1, 2, 3)) - 0.6))
        return logits


def toy_images():
    """Two images per class: its own band at 0.5, everything else at 0.1, plus noise of 0.02."""
    gen = torch.Generator().manual_seed(0)
    x = 0.1 + 0.02 * torch.rand(20, 3, 32, 32, generator=gen)
    for i in range(20):
        x[i, :, 3 * (i % 10):3 * (i % 10) + 3] += 0.4
    return x


@pytest.mark.parametrize("backdoor", [True, False])
def test_scan_flags_a_planted_backdoor_and_not_its_clean_twin(backdoor):
    fams = {"mask": MaskPattern(), "universal": Universal(lr=0.02)}
    found, summaries, said, target = scan_model(Bands(backdoor), toy_images(), fams, 10, out=lambda *_: None,
                                                passes=40, batch_size=20, success=0.9)
    if backdoor:
        assert said == "backdoored" and target == 0
        assert 0 in summaries["mask"]["flagged"]
        assert summaries["mask"]["size"][0] < 0.5 * min(summaries["mask"]["size"][1:])
    else:
        assert said == "no backdoor found" and target is None
        assert all(not s["flagged"] for s in summaries.values())
        assert max(max(s["anomaly_index"]) for s in summaries.values()) < 2


def test_verdict_counts_families_then_index():
    s = {"mask": {"flagged": [3], "anomaly_index": [0] * 3 + [2.5] + [0] * 6},
         "universal": {"flagged": [5, 3], "anomaly_index": [0] * 3 + [3.0, 0, 4.0] + [0] * 4}}
    assert verdict(s) == ("backdoored", 3)   # flagged by both families
    s["mask"]["flagged"] = []
    assert verdict(s) == ("backdoored", 5)   # one family each: the larger index
    s["universal"]["flagged"] = []
    assert verdict(s) == ("no backdoor found", None)


def test_margin_is_the_nearest_class_below_the_median_against_the_threshold():
    """Sizes 1 2 5 6 9 (median 5): the classes below it have indices 3.0 and 2.5 here, so the margin to the
    threshold 2 is +1.0; a large index above the median (class 4) does not count."""
    s = {"size": [1, 2, 5, 6, 9], "anomaly_index": [3.0, 2.5, 0.0, 0.3, 9.0]}
    assert margin(s, 2.0) == pytest.approx(1.0)
    assert margin(s, 3.5) == pytest.approx(-0.5)


def scan_flags(read_dir, out):
    return ["--read_dir", str(read_dir), "--output_dir", str(out), "--dataset", "synthetic", "--finetunedata",
            "synthetic", "--synthetic_train", "256", "--synthetic_test", "64", "--nc_images", "32", "--nc_passes", "2",
            "--nc_batch", "32", "--device", "cpu"]


def test_scan_writes_its_files_and_reads_the_trigger_only_after_the_verdict(tmp_path, monkeypatch):
    teacher = write_teacher_dir(tmp_path / "teacher")
    out = tmp_path / "scan"
    opened = []
    real_load = torch.load

    def spying_load(f, *a, **kw):
        name = os.path.basename(str(f))
        if name in ("pattern.pt", "mask.pt"):
            verdict_written = os.path.isfile(out / "scan.json") and "verdict" in json.loads((out / "scan.json").read_text())
            opened.append((name, verdict_written))
        return real_load(f, *a, **kw)
    monkeypatch.setattr(torch, "load", spying_load)
    results = scan.main(scan_flags(teacher, out) + ["--families", "mask", "universal"])
    assert sorted(opened) == [("mask.pt", True), ("pattern.pt", True)]  # opened, and only after the verdict
    saved = json.loads((out / "scan.json").read_text())
    assert saved["verdict"] == results["verdict"] and set(saved["families"]) == {"mask", "universal"}
    fam = saved["families"]["mask"]
    assert len(fam["size"]) == len(fam["anomaly_index"]) == len(fam["success"]) == len(fam["trace"]) == 10
    assert fam["statistic"] == "ratio" and fam["anomaly_index"] == fam["index_ratio"] and saved["threshold"] == 2.5
    assert fam["index_mad"] == pytest.approx(anomaly_index(fam["size"])[0].tolist())
    median = sorted(fam["size"])[4]  # the lower middle of ten
    assert fam["index_ratio"] == pytest.approx([median / v for v in fam["size"]])
    assert fam["gap"] == pytest.approx(sorted(fam["size"])[1] / sorted(fam["size"])[0])
    assert all(len(t) == p == 2 for t, p in zip(fam["trace"], fam["passes"]))  # --nc_passes 2, no early stop
    inverted = torch.load(out / "inverted.pt", weights_only=True)  # the inverted triggers, per family and class
    assert [tuple(p.shape) for p in inverted["mask"][3]] == [(1, 32, 32), (3, 32, 32)]
    assert [tuple(p.shape) for p in inverted["universal"][3]] == [(3, 32, 32)]
    assert -1 <= saved["evaluation"]["mask"]["cosine"] <= 1 and saved["evaluation"]["true_mask_l1"] == pytest.approx(36 * 0.3)
    assert (out / "scan.png").stat().st_size > 0 and (out / "args.json").is_file()


def test_scan_of_a_folder_without_trigger_has_no_evaluation(tmp_path):
    teacher = write_teacher_dir(tmp_path / "teacher")
    for name in ("pattern.pt", "mask.pt"):
        os.remove(os.path.join(teacher, name))
    results = scan.main(scan_flags(teacher, tmp_path / "scan") + ["--families", "mask"])
    assert "evaluation" not in results and set(results["families"]) == {"mask"}


def test_scan_refuses_a_missing_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        scan.main(scan_flags(tmp_path / "nowhere", tmp_path / "scan"))
    assert e.value.code == 2
    assert "read_dir not found" in capsys.readouterr().err
    assert not (tmp_path / "scan").exists()


@pytest.mark.parametrize("flag,value,said", [("--nc_images", "0", "--nc_images must be >= 1, not 0"),
                                             ("--nc_threshold", "-1", "--nc_threshold must be > 0, not -1.0"),
                                             ("--nc_threshold", "1", "--nc_threshold must be above 1"),
                                             ("--nc_success", "1.5", "--nc_success must be in (0, 1]"),
                                             ("--nc_stop", "-2", "--nc_stop must be >= 0")])
def test_scan_refuses_flags_out_of_range_before_any_folder(tmp_path, capsys, flag, value, said):
    teacher = write_teacher_dir(tmp_path / "teacher")
    with pytest.raises(SystemExit) as e:
        scan.main(scan_flags(teacher, tmp_path / "scan") + [flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and said in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "scan").exists()
