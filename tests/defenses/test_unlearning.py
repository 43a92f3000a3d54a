"""The unlearning defenses (ibau, sau, nc): each runs end to end on a teacher folder written here, logs what its
perturbation does to the teacher and the student, and keeps to its own rules (the frozen teacher, the ball,
the share of stamped images)."""
import json

import pytest
import torch

import distri
from helper.defenses.ibau import self_retrospection_loss, universal_unlearning_loss
from helper.defenses.nc import stamp_share
from helper.train.perturb import MaskPattern, soft_kl
from tests.conftest import fast_flags, write_teacher_dir

SMALL_NC = ["--nc_images", "32", "--nc_passes", "2", "--nc_batch", "32"]


def rows(folder):
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("defense,extra", [("ibau", []), ("ibau", ["--adv_search", "teacher", "--adv_steps", "2"]),
                                           ("sau", ["--adv_steps", "2"]), ("nc", SMALL_NC)])
def test_defense_runs_two_epochs_and_logs_its_perturbation(tmp_path, defense, extra):
    teacher = write_teacher_dir(tmp_path / "teacher")
    before = torch.load(f"{teacher}/checkpoint.pkl", weights_only=True)[0]
    out = tmp_path / "run"
    results = distri.main(fast_flags(teacher, out) + ["--defense", defense, *extra])
    assert results["defense"] == defense and len(rows(out)) == 2
    assert 0 <= results["acc"] <= 1 and (out / "selected.pkl").is_file()
    after = torch.load(f"{teacher}/checkpoint.pkl", weights_only=True)[0]
    assert all(torch.equal(before[k], after[k]) for k in before)  # the teacher folder is untouched
    diag = rows(out)[-1]["diag"]
    if defense == "nc":
        nc = results["nc"]
        assert len(nc["mask_l1"]) == len(nc["anomaly_index"]) == 10
        assert nc["unlearned_class"] == (nc["flagged"][0] if nc["flagged"] else None)
        return
    for model in ("teacher", "student"):
        assert set(diag["adv"][model]) == {"flip", "top", "top_share"}
    if defense == "ibau":
        assert diag["adv"]["delta_l2"] == pytest.approx(3.0, rel=1e-4)  # a random start on the sphere, projected
        assert "unlearn" in rows(out)[-1]
    else:
        assert 0 <= diag["adv"]["shared"] <= diag["adv"]["common"] <= 1


def test_args_record_each_defense_defaults(tmp_path):
    """The defaults of their public code where they carry over (helper/defenses/*.py): SAU's Adam 1e-4, batch
    256, L-inf 0.2 in 5 steps of 0.2; I-BAU with an L2 ball."""
    teacher = write_teacher_dir(tmp_path / "teacher")
    args = distri.defense_parser(["--defense", "sau"]).parse_args(["--defense", "sau"])
    assert (args.opt_type, args.opt_lr, args.batch_size, args.adv_radius, args.adv_steps, args.adv_lr) == \
        ("Adam", 1e-4, 256, 0.2, 5, 0.2)
    args = distri.defense_parser(["--defense", "ibau"]).parse_args(["--defense", "ibau"])
    assert (args.adv_search, args.adv_radius, args.adv_steps, args.opt_lr) == ("student", 3.0, 1, 0.01)
    assert teacher  # the folder fixture is not needed beyond parsing


def test_bad_budget_is_one_line(tmp_path, capsys):
    teacher = write_teacher_dir(tmp_path / "teacher")
    with pytest.raises(SystemExit) as e:
        distri.main(fast_flags(teacher, tmp_path / "run") + ["--defense", "ibau", "--adv_radius", "0"])
    assert e.value.code == 2 and "--adv_radius" in capsys.readouterr().err


def test_unlearning_losses_by_hand():
    t = torch.tensor([[0.0, 0.0]])
    s = torch.tensor([[0.0, torch.log(torch.tensor(3.0))]])
    kd = torch.tensor(0.5)
    expected = 0.5 + 2 * soft_kl(t, s).item()
    loss, term = universal_unlearning_loss(kd, s, t, 2.0)
    assert loss.item() == pytest.approx(expected) and term.item() == pytest.approx(soft_kl(t, s).item())
    assert self_retrospection_loss(s, t).item() == pytest.approx(soft_kl(s, t).item())


def test_stamp_share_stamps_the_first_part_of_the_batch():
    fam = MaskPattern()
    params = [torch.full((1, 2, 2), 50.0), torch.full((3, 2, 2), 50.0)]  # mask 1, pattern white
    x = torch.zeros(10, 3, 2, 2)
    y = stamp_share(x, 0.2, fam, params)
    assert torch.allclose(y[:2], torch.ones(2, 3, 2, 2)) and torch.equal(y[2:], x[2:])
    assert torch.equal(stamp_share(x, 0.2, fam, None), x)   # nothing flagged: plain KD


def test_fused_ascent_moves_delta_along_the_students_gradient(tmp_path):
    """With --adv_search student the student's own backward gives delta's step: after one step delta has moved
    (its direction is no longer the random start) and it stays on or inside the ball."""
    from helper.defenses.ibau import IBAU
    from models import resnet18
    args = distri.defense_parser(["--defense", "ibau"]).parse_args(["--defense", "ibau", "--adv_radius", "1.0"])
    torch.manual_seed(0)
    teacher, student = resnet18(10, 4), resnet18(10, 4)
    d = IBAU(args, teacher, torch.device("cpu"), None, 8)
    step = d.stages(student)[0].step
    start = d.delta.clone()
    named = step(torch.rand(8, 3, 32, 32))
    assert set(named) == {"kd_loss", "unlearn"}
    assert not torch.allclose(d.delta, start) and d.delta.norm().item() <= 1.0 + 1e-5
    assert all(p.grad is None for p in teacher.parameters())
