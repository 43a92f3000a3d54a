"""Attention maps (helper.report.attention), the figure commands (helper.report.figures) and the trigger figure (helper.report.plot)."""
import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

import distri
from helper.report import figures
from helper.report.attention import (
    GROUPS,
    attention_map,
    group_attention,
    mask_region_means,
    picture_indices,
    summary_indices,
    trigger_region,
    unit_range,
    upsample,
    write_run_attention,
)
from helper.report import plot
from helper.report.plot import _compact, plot_curves, plot_trigger
from helper.run.checkpoint import save_checkpoint
from helper.train.losses import attention_map as nad_attention_map
from models import resnet18
from tests import ROOT, read_json, write_json_file
from tests.conftest import TEST_WIDTH, fast_flags, write_teacher_dir

PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path):
    with open(path, "rb") as f:
        head = f.read(8)
    return head == PNG and os.path.getsize(path) > 1000


def _corner_mask(size=6, value=0.3):
    mask = torch.zeros(1, 32, 32)
    mask[:, -size:, -size:] = value
    return mask


# ---------------------------------------------------------------- the map and its numbers

def test_attention_map_by_hand():
    # (1 image, 2 channels, 1 x 2): position 0 has 1^2 + (-1)^2 = 2, position 1 has 2^2 + 0^2 = 4
    f = torch.tensor([[[[1.0, 2.0]], [[-1.0, 0.0]]]])
    torch.testing.assert_close(attention_map(f), torch.tensor([[[2.0, 4.0]]]))
    # two images, three channels, 2 x 2: image 1 is image 0 times 2, so its map is 4 times as large
    g = torch.tensor([[[[1.0, 0.0], [3.0, -1.0]], [[2.0, 1.0], [0.0, 0.0]], [[0.0, -2.0], [1.0, 1.0]]]])
    g = torch.cat([g, 2 * g])
    expected = torch.tensor([[1 + 4 + 0, 0 + 1 + 4], [9 + 0 + 1, 1 + 0 + 1]], dtype=torch.float32)
    torch.testing.assert_close(attention_map(g), torch.stack([expected, 4 * expected]))
    # NAD's map is the same one, flattened and L2-normalised
    flat = attention_map(g).flatten(1)
    torch.testing.assert_close(nad_attention_map(g), flat / (flat.norm(dim=1, keepdim=True) + 1e-6))


def test_upsample_and_unit_range():
    const = torch.full((2, 4, 4), 3.0)
    torch.testing.assert_close(upsample(const), torch.full((2, 32, 32), 3.0))  # bilinear keeps a constant
    ramp = torch.arange(16.0).view(1, 4, 4)
    up = upsample(ramp)
    assert up.shape == (1, 32, 32) and up.min() >= 0 and up.max() <= 15
    u = unit_range(torch.cat([up, torch.full((1, 32, 32), 7.0)]))
    assert u[0].min() == 0 and u[0].max() == 1
    assert (u[1] == 0).all()  # a constant map has no range: drawn as the lowest colour


def test_inside_and_outside_the_mask_on_a_constructed_case():
    inside = trigger_region(_corner_mask(6))  # the 36 pixels of the bottom-right 6 x 6
    assert int(inside.sum()) == 36
    # a feature that is 2 on the trigger and 1 elsewhere: its map is 4 there and 1 elsewhere
    feature = torch.ones(1, 1, 32, 32)
    feature[..., -6:, -6:] = 2.0
    maps = upsample(attention_map(feature))  # 32 -> 32 is the identity
    mean = (36 * 4 + (1024 - 36) * 1) / 1024
    r = mask_region_means(maps, inside)
    assert r["inside"] == pytest.approx(4 / mean) and r["outside"] == pytest.approx(1 / mean)
    assert r["inside_over_outside"] == pytest.approx(4.0)
    share = 36 / 1024
    assert share * r["inside"] + (1 - share) * r["outside"] == pytest.approx(1.0)  # the normalisation's identity
    # scale-free: the same map 1000 times larger gives the same numbers; a dead (all-zero) map is left out
    r2 = mask_region_means(torch.cat([1000 * maps, torch.zeros(1, 32, 32)]), inside)
    assert r2["inside"] == pytest.approx(r["inside"]) and r2["n_images"] == 1
    # an even map puts exactly its share on the trigger
    assert mask_region_means(torch.ones(3, 32, 32), inside)["inside_over_outside"] == pytest.approx(1.0)


def test_a_mask_of_nothing_or_everything_gives_null_with_a_reason():
    maps = torch.rand(2, 32, 32)
    empty = mask_region_means(maps, trigger_region(torch.zeros(1, 32, 32)))
    full = mask_region_means(maps, trigger_region(torch.full((1, 32, 32), 0.5)))
    for r, word in ((empty, "no inside"), (full, "no outside")):
        assert r["inside"] is None and r["outside"] is None and r["inside_over_outside"] is None
        assert word in r["reason"]
    assert "dead" in mask_region_means(torch.zeros(2, 32, 32), trigger_region(_corner_mask()))["reason"]
    assert int(trigger_region(torch.full((1, 32, 32), 0.01)).sum()) == 0  # 0.01 itself is not above the threshold


def test_the_images_drawn_are_fixed_and_leave_the_target_out():
    labels = torch.tensor([0, 3, 3, 1, 0, 5, 2, 1, 4, 0])
    assert picture_indices(labels, 0, 4) == [3, 6, 1, 8]  # the first of classes 1, 2, 3, 4
    assert picture_indices(labels, 1, 3) == [0, 6, 1]  # target 1: classes 0, 2, 3
    assert summary_indices(labels, 0, 5) == [1, 2, 3, 5, 6]


def test_group_attention_on_the_resnet():
    model = resnet18(10, TEST_WIDTH).train()
    x = torch.rand(3, 3, 32, 32)
    maps = group_attention(model, x, batch_size=2)
    assert set(maps) == set(GROUPS)
    assert all(m.shape == (3, 32, 32) and (m >= 0).all() for m in maps.values())
    assert model.training  # the mode is restored
    assert not model.layer1._forward_hooks  # the hooks are removed


# ---------------------------------------------------------------- a run writes attention.png and attention.json

def test_a_defense_run_writes_attention_files(teacher_dir, tmp_path):
    out = tmp_path / "run"
    distri.main(fast_flags(teacher_dir, out, epochs=1) + ["--no_progress"])
    assert _is_png(out / "attention.png")
    summary = read_json(out / "attention.json")
    assert summary["student_state"] == "selected" and summary["groups"] == list(GROUPS)
    assert summary["mask_pixels_inside"] == 36 and summary["mask_threshold"] == 0.01
    assert len(summary["indices"]) == summary["n_images"] and 0 < summary["n_images"] <= 128
    assert len(summary["picture_indices"]) == 4 and summary["target_label"] == 0
    for model in ("teacher", "student"):
        for g in GROUPS:
            for kind in ("clean", "triggered"):
                r = summary[model][g][kind]
                assert math.isfinite(r["inside"]) and math.isfinite(r["outside"]) and r["inside"] >= 0
    assert (out / "results.json").exists()


def test_models_without_residual_groups_are_skipped_with_one_line(tmp_path):
    lines = []
    tiny = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.Flatten())
    assert write_run_attention(str(tmp_path), tiny, tiny, None, None, None, None, 0, lines.append) is None
    assert len(lines) == 1 and "skipped" in lines[0] and not os.listdir(tmp_path)


# ---------------------------------------------------------------- the commands

def _fake_run(path, teacher_dir, defense="asd", ratio_type="scheduler", seed=1, dataset="synthetic"):
    """A finished defense run folder as distri.py leaves it, for what the figure commands read."""
    os.makedirs(path)
    args = {"read_dir": str(teacher_dir), "dataset": dataset, "synthetic_test": 64, "synthetic_seed": 0,
            "target_label": 0, "defense": defense, "ratio_type": ratio_type, "thresh_mask": None}
    write_json_file(os.path.join(path, "args.json"), args)
    write_json_file(os.path.join(path, "results.json"),
                    {"acc": 0.5, "asr": 0.25, "teacher_acc": 0.9, "teacher_asr": 1.0})
    torch.manual_seed(seed)
    save_checkpoint(resnet18(10, TEST_WIDTH), os.path.join(path, "selected.pkl"))
    return str(path)


def test_attention_command_draws_runs_of_one_teacher_side_by_side(teacher_dir, tmp_path, capsys):
    kd = _fake_run(tmp_path / "kd", teacher_dir, ratio_type="fix")
    asd = _fake_run(tmp_path / "asd", teacher_dir, seed=2)
    out = str(tmp_path / "cmp.png")
    assert figures.main(["attention", kd, asd, "--layers", "layer3", "layer4", "--images", "2", "--out", out]) == out
    assert _is_png(out) and "written to" in capsys.readouterr().out
    assert figures.defense_label({"args": {"defense": "asd"}, "results": {"defense_label": "KD"}}) == "KD"
    assert figures.defense_label({"args": {"defense": "bcu"}, "results": None}) == "BCU"  # a run without the field


def test_attention_command_refuses_runs_of_different_teachers(teacher_dir, tmp_path, capsys):
    other = write_teacher_dir(tmp_path / "other_teacher", seed=1)
    a = _fake_run(tmp_path / "a", teacher_dir)
    b = _fake_run(tmp_path / "b", other)
    with pytest.raises(SystemExit) as exc:
        figures.main(["attention", a, b, "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "runs of different teachers" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.png").exists()
    # the same through the module's command line
    proc = subprocess.run([sys.executable, "-m", "helper.report.figures", "attention", a, b, "--out", str(tmp_path / "y.png")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: runs of different teachers")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_attention_command_refuses_a_folder_that_is_not_a_finished_run(teacher_dir, tmp_path, capsys):
    run = _fake_run(tmp_path / "r", teacher_dir)
    os.remove(os.path.join(run, "selected.pkl"))
    with pytest.raises(SystemExit) as exc:
        figures.main(["attention", run, "--out", str(tmp_path / "x.png")])
    assert exc.value.code == 2 and "no selected.pkl" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        figures.main(["attention", str(teacher_dir), "--out", str(tmp_path / "x.png")])  # no args.json
    assert "not a run folder" in capsys.readouterr().err


def test_trigger_command_draws_a_teacher_folder(teacher_dir, tmp_path):
    write_json_file(os.path.join(teacher_dir, "args.json"),
                    {"dataset": "synthetic", "synthetic_test": 32, "synthetic_seed": 0})
    out = str(tmp_path / "trigger.png")
    figures.main(["trigger", teacher_dir, "--images", "4", "--out", out])
    assert _is_png(out)


def test_trigger_figure_with_an_empty_mask(tmp_path):
    """No trigger at all: PSNR is inf, drawn as such, and nothing divides by the zero mask."""
    x = torch.rand(3, 3, 32, 32)
    plot_trigger(torch.rand(3, 32, 32), torch.zeros(1, 32, 32), x, x.clone(), str(tmp_path / "t.png"))
    assert _is_png(tmp_path / "t.png")


def test_framework_command_writes_the_figure(tmp_path):
    out = str(tmp_path / "framework.png")
    figures.main(["framework", "--out", out])
    assert _is_png(out)
    with pytest.raises(SystemExit):
        figures.main(["framework", "--epochs", "20", "--out", out])


def test_only_a_patch_is_outlined():
    assert _compact(trigger_region(_corner_mask(3)))
    assert not _compact(torch.zeros(32, 32, dtype=torch.bool)) and not _compact(torch.ones(32, 32, dtype=torch.bool))
    scatter = torch.zeros(32, 32, dtype=torch.bool)
    scatter[::2, ::2] = True  # every other pixel: an outline would cover the image
    assert not _compact(scatter)


def test_nothing_in_the_package_shows_a_figure():
    needle = "plt." + "show("  # built here so that this file does not match itself
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in (".git", "runs", "data", "__pycache__", ".pytest_cache")]
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as f:
                    text = f.read()
                if needle in text or ("pyplot." + "show(") in text:
                    found.append(os.path.relpath(path, ROOT))
    assert not found, f"figures are shown, not saved, in: {found}"


def test_a_grid_runs_column_is_named_by_its_arm():
    from helper.report.figures import folder_label
    assert folder_label(os.path.join("runs", "grid", "asd-bn-n5000", "seed2")) == "asd-bn seed2"
    assert folder_label(os.path.join("runs", "real-kd-w8")) == "real-kd-w8"
    assert folder_label(os.path.join("runs", "x", "seed1")) == "seed1"  # no arm folder above it


def _grid_run(folder, acc, asr_nt, retune_nt=None):
    os.makedirs(folder)
    r = {"acc": acc, "asr": asr_nt + 0.05, "asr_nontarget": asr_nt, "ra": acc / 2, "asr_last10_mean": asr_nt}
    if retune_nt is not None:
        r.update(retune_acc=acc, retune_asr=retune_nt + 0.05, retune_asr_nontarget=retune_nt, retune_ra=0.1)
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(r, f)


def test_the_defenses_figure_reads_finished_runs_of_every_invocation(tmp_path, capsys):
    grid = tmp_path / "grid"
    for teacher in ("badnets", "adba"):
        _grid_run(grid / teacher / "kd-n5000" / "seed0", 0.6, 0.9, 0.9)
        _grid_run(grid / teacher / "kd-n5000" / "seed1", 0.8, 0.7, 0.7)
        _grid_run(grid / teacher / "ibau-r1.5-n5000" / "seed0", 0.3, 0.1, 0.2)
    os.makedirs(grid / "badnets" / "sau-n5000" / "seed0")   # started, not finished: no results.json
    (grid / "floor").mkdir()
    (grid / "floor" / "results.json").write_text(json.dumps({"asr_nontarget": 0.02}))

    cells = figures.grid_cells_of(str(grid / "badnets"), seeds=[0])
    assert [(e["arm"], e["n_defense"], e["n_runs"]) for e in cells] == [("ibau-r1.5", 5000, 1), ("kd", 5000, 1)]
    assert cells[1]["acc"] == 0.6 and cells[1]["retune_asr_nontarget"] == 0.9
    both = figures.grid_cells_of(str(grid / "badnets"), cells=["kd", "ibau-r1.5"])
    assert [e["arm"] for e in both] == ["kd", "ibau-r1.5"] and both[0]["acc_mean"] == pytest.approx(0.7)

    out = str(tmp_path / "defenses.png")
    assert figures.main(["defenses", str(grid), "--teachers", "badnets", "adba", "--floors", str(grid / "floor"),
                         str(grid / "floor"), "--out", out]) == out
    assert _is_png(out)
    with pytest.raises(SystemExit) as e:
        figures.main(["defenses", str(grid), "--teachers", "badnets", "--cells", "ibau-r1.5", "--out", out])
    assert e.value.code != 0 and "no finished kd run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        figures.main(["defenses", str(grid), "--teachers", "badnets", "adba", "--floors", str(grid / "floor")])
    assert "one per teacher" in capsys.readouterr().err


def test_curves_command_draws_the_evaluated_epochs_and_refuses_what_it_cannot_draw(teacher_dir, tmp_path, capsys):
    runs = []
    for k, name in enumerate(("ibau", "target")):
        run = _fake_run(tmp_path / name, teacher_dir, defense="ibau", seed=k)
        rows = [{"epoch": e, "kd_loss": 1.0, **({"acc": 0.5 + 0.01 * e, "asr_nontarget": 0.5 - 0.05 * e} if e % 2 else {})}
                for e in range(6)]
        (tmp_path / name / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs.append(run)
    floor = tmp_path / "floor"
    floor.mkdir()
    (floor / "results.json").write_text(json.dumps({"asr_nontarget": 0.03}))
    out = str(tmp_path / "curves.png")
    assert figures.main(["curves", *runs, "--labels", "ibau", "targeted", "--floor", str(floor), "--out", out]) == out
    assert _is_png(out)
    with pytest.raises(SystemExit) as e:
        figures.main(["curves", *runs, "--labels", "one", "--out", out])
    assert e.value.code == 2 and "2 runs" in capsys.readouterr().err
    (tmp_path / "target" / "log.jsonl").write_text(json.dumps({"epoch": 0, "kd_loss": 1.0}) + "\n")
    with pytest.raises(SystemExit):
        figures.main(["curves", *runs, "--out", out])
    assert "no evaluated epoch" in capsys.readouterr().err


def test_curves_use_a_log_loss_axis_only_when_every_loss_is_positive(tmp_path, monkeypatch):
    """A KL at rounding noise (SAU's on a teacher its search cannot fool) is 0 or -1e-6: a linear axis, no
    warning; positive losses keep the log axis."""
    scales, save = [], plot.save_figure
    monkeypatch.setattr(plot, "save_figure", lambda fig, path: (scales.append(fig.axes[0].get_yscale()), save(fig, path)))
    rows = [{"epoch": e, "kd_loss": v, "acc": 0.5} for e, v in enumerate([-1.9e-6, 0.0, 2e-6])]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_curves(rows, tmp_path / "noise.png", "noise", best_epoch=0)
        plot_curves([dict(r, kd_loss=0.5 / (r["epoch"] + 1)) for r in rows], tmp_path / "kd.png")
        plot_curves([dict(r, kd_loss=0.5, asl=-0.1) for r in rows], tmp_path / "asl.png")  # an ASL below 0 counts
    assert scales == ["linear", "log", "linear"]
    assert all(_is_png(tmp_path / f) for f in ("noise.png", "kd.png", "asl.png"))
