"""Issue 29: numbers that mean what the table says. ASD refuses bf16, --lr_drop on is refused where no lr drop
exists, and every run is evaluated at one precision (fp32, TF32 off) whatever it trained in."""

import pytest
import torch

import distri
from helper.train import evaluate as E
from tests import read_json
from tests.conftest import fast_flags


@pytest.mark.parametrize("extra", [[], ["--ratio_type", "fix", "--new_loss_ratio", "0.5"]])
def test_asd_with_bf16_is_refused_before_any_folder(teacher_dir, tmp_path, capsys, extra):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        distri.main(fast_flags(teacher_dir, out) + ["--amp", "bf16", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--amp bf16" in err[0] and "ASL" in err[0]
    assert not out.exists()


def test_plain_kd_may_run_in_bf16(teacher_dir, tmp_path):
    """KD (--ratio_type fix, ASL weight 0) has no ASL: bf16 is its choice; the evaluation stays fp32."""
    out = tmp_path / "kd"
    results = distri.main(fast_flags(teacher_dir, out, epochs=1) + ["--ratio_type", "fix", "--amp", "bf16"])
    assert results["train_precision"] == "bfloat16" and results["eval_precision"] == "fp32"


@pytest.mark.parametrize("defense", ["ibau", "renofeation", "nad", "bcu"])
def test_lr_drop_on_is_refused_where_no_drop_exists(teacher_dir, tmp_path, capsys, defense):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        distri.main(fast_flags(teacher_dir, out) + ["--defense", defense, "--lr_drop", "on"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--lr_drop on" in err[0] and defense in err[0]
    assert not out.exists()


def test_lr_drop_is_recorded_only_where_it_applies(teacher_dir, tmp_path):
    kd = distri.main(fast_flags(teacher_dir, tmp_path / "kd", epochs=1) + ["--ratio_type", "fix", "--lr_drop", "on"])
    assert read_json(tmp_path / "kd" / "args.json")["lr_drop_enabled"] is True and "acc" in kd
    distri.main(fast_flags(teacher_dir, tmp_path / "ft", epochs=1) + ["--defense", "finetune"])
    assert read_json(tmp_path / "ft" / "args.json")["lr_drop_enabled"] is False


def test_every_defense_is_evaluated_without_autocast(teacher_dir, tmp_path, monkeypatch):
    """The run's training precision does not reach its evaluation: every evaluate() call of a bf16 KD run gets
    amp None (fp32, TF32 off)."""
    seen = []
    real = E.evaluate

    def spy(model, eval_set, batch_size=1000, amp=None, memory_format=torch.contiguous_format):
        seen.append(amp)
        return real(model, eval_set, batch_size, amp, memory_format)
    monkeypatch.setattr("helper.jobs.distill.evaluate", spy)
    distri.main(fast_flags(teacher_dir, tmp_path / "kd", epochs=1) + ["--ratio_type", "fix", "--amp", "bf16"])
    assert seen and all(a is None for a in seen)


def test_evaluation_turns_tf32_off_on_cuda_and_restores_it(monkeypatch):
    """evaluate() in fp32 runs inside tf32_off; on the CPU that is a no-op, so check the context is entered."""
    entered = []
    real = E.tf32_off

    def spy(device):
        entered.append(device.type)
        return real(device)
    monkeypatch.setattr(E, "tf32_off", spy)
    from models import resnet18
    model = resnet18(10, 4)
    split = type("S", (), {"x": torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8), "y": torch.arange(4)})
    eval_set = E.EvalSet.build(split, torch.rand(3, 32, 32), torch.zeros(1, 32, 32), 0, torch.device("cpu"))
    E.evaluate(model, eval_set)
    assert entered == ["cpu"]
    E.evaluate(model, eval_set, amp=torch.bfloat16)   # an explicit autocast (bench.py's timing) does not
    assert entered == ["cpu"]
