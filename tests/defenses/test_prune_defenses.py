"""CLP and Fine-Pruning (helper/defenses/clp.py, fineprune.py): hand-computed bounds, the pruning order and its
stopping rule, the mask kept through KD and through save/load, and both defenses end to end."""
import copy
import os

import pytest
import torch

import distri
from helper.data.teacher_dir import write_teacher
from helper.defenses import DEFENSES
from helper.defenses.clp import ZeroHold, channel_lipschitz, clp_masks, conv_bn_pairs
from helper.defenses.fineprune import mean_activation, prune_search, step_size
from helper.defenses.options import defense_parser
from models import resnet18
from tests import read_json
from tests.conftest import fast_flags

CPU = torch.device("cpu")


def _defense(name, model, images=None, flags=()):
    argv = ["--defense", name, "--device", "cpu", *flags]
    args = defense_parser(argv).parse_args(argv)
    teacher = copy.deepcopy(model)
    return DEFENSES[name](args, teacher, CPU, None, 0 if images is None else len(images), images)


# ---------------------------------------------------------------- CLP

def test_clp_bound_by_hand():
    conv, bn = torch.nn.Conv2d(3, 2, 3, bias=False), torch.nn.BatchNorm2d(2)
    a, b = torch.tensor([1.0, 2.0, 2.0]), torch.arange(9.0).reshape(3, 3)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0] = a[:, None, None] * b  # rank one: the (3, 9) matrix a vec(b)^T has sigma = |a| |b|_F
        conv.weight[1, 0, 0, 0], conv.weight[1, 1, 1, 1], conv.weight[1, 2, 2, 2] = 3.0, -4.0, 2.0  # orthogonal rows
        bn.weight.copy_(torch.tensor([-3.0, 2.0]))  # |gamma| / sqrt(var): 3 / 2 and 2 / 4
        bn.running_var.copy_(torch.tensor([4.0, 16.0]))
    expected = [1.5 * 3.0 * b.norm().item(), 0.5 * 4.0]
    assert channel_lipschitz(conv, bn).tolist() == pytest.approx(expected, rel=1e-5)


def test_clp_bound_is_the_public_formula_on_random_weights():
    torch.manual_seed(0)
    conv, bn = torch.nn.Conv2d(5, 6, 3, bias=False), torch.nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.weight.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    ref = [torch.linalg.svdvals(conv.weight[k].reshape(5, -1) * (bn.weight[k] / bn.running_var[k].sqrt()).abs())[0]
           for k in range(6)]
    torch.testing.assert_close(channel_lipschitz(conv, bn), torch.stack(ref).detach())


def _outlier_layer(norm=10.0, channel=5, n=16):
    model = torch.nn.Sequential(torch.nn.Conv2d(4, n, 1, bias=False), torch.nn.BatchNorm2d(n))
    with torch.no_grad():
        w = torch.randn(n, 4, 1, 1, generator=torch.Generator().manual_seed(0))
        w = w / w.flatten(1).norm(dim=1)[:, None, None, None] * (1 + 0.01 * torch.arange(n))[:, None, None, None]
        w[channel] *= norm
        model[0].weight.copy_(w)
        model[1].bias.fill_(0.5)
    return model


def test_clp_prunes_the_outlier_channel_only_and_zeroes_its_output():
    model = _outlier_layer()
    masks = clp_masks(model, 3.0)
    assert list(masks) == ["1"] and masks["1"].nonzero().flatten().tolist() == [5]
    assert not clp_masks(model, 4.0)["1"].any()  # z = 3.75 for one outlier among 16: u = 4 keeps it
    ZeroHold([(model[1].weight, masks["1"]), (model[1].bias, masks["1"])])
    x = torch.randn(8, 4, 5, 5)
    for train in (True, False):
        out = model.train(train)(x)
        assert out[:, 5].abs().max() == 0 and out[:, 4].abs().max() > 0


def test_clp_pairs_every_batch_norm_of_resnet18_with_its_convolution():
    model = resnet18(10, 4)
    pairs = {name: conv for name, conv, _ in conv_bn_pairs(model)}
    modules = dict(model.named_modules())
    bns = [n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert list(pairs) == bns and len(bns) == 20
    assert pairs["bn1"] is model.conv1 and pairs["layer2.0.bn2"] is modules["layer2.0.conv2"]
    assert pairs["layer3.0.shortcut.1"] is modules["layer3.0.shortcut.0"]


def _teacher_with_outlier(width=4, layer="layer4.1", channel=7, scale=30.0):
    torch.manual_seed(0)
    model = resnet18(10, width)
    with torch.no_grad():
        dict(model.named_modules())[f"{layer}.conv2"].weight[channel] *= scale
    return model


@pytest.mark.parametrize("opt", [["--opt_type", "SGD", "--weight_decay", "5e-4"], ["--opt_type", "Adam"]])
def test_clp_channels_stay_pruned_during_kd(opt):
    model = _teacher_with_outlier()
    defense = _defense("clp", model, flags=["--opt_lr", "0.05", *opt])
    student = copy.deepcopy(model).requires_grad_(True)
    prepared = defense.prepare(student)
    assert prepared["clp_pruned"]["layer4.1.bn2"] == 1 and prepared["clp_pruned_total"] >= 1
    bn = student.layer4[1].bn2
    assert bn.weight[7] == 0 and bn.bias[7] == 0
    before = {k: v.clone() for k, v in student.state_dict().items()}
    stage = defense.stages(student)[-1]
    stage.begin(0)
    student.train()
    torch.manual_seed(1)
    for _ in range(3):
        stage.step(torch.rand(16, 3, 32, 32))
    defense.close()
    assert bn.weight[7] == 0 and bn.bias[7] == 0
    assert not torch.equal(bn.weight, before["layer4.1.bn2.weight"])  # the other channels trained
    for name, m in student.named_modules():  # every channel CLP pruned is still 0
        if isinstance(m, torch.nn.BatchNorm2d):
            off = (before[f"{name}.weight"] == 0) & (before[f"{name}.bias"] == 0)
            assert (m.weight[off] == 0).all() and (m.bias[off] == 0).all()


# ---------------------------------------------------------------- Fine-Pruning

def test_fineprune_step_rounds_up_to_at_least_one_channel():
    assert [step_size(n, s) for n, s in [(32, 0.01), (512, 0.01), (300, 0.01), (100, 0.01), (10, 1.0)]] == [1, 6, 3, 1, 10]


def test_fineprune_stops_before_the_step_that_drops_agreement_by_more_than_max_drop():
    seq = [0.95, 0.94, 0.90, 0.86, 0.84, 0.99, 0.99]
    calls = []

    def agreement(n):
        calls.append(n)
        return seq[n]
    assert prune_search(7, 1, agreement, 0.1) == (3, seq[:5])  # 0.95 - 0.86 = 0.09 kept, 0.11 refused
    assert calls == [0, 1, 2, 3, 4]
    calls.clear()
    assert prune_search(7, 2, lambda n: calls.append(n) or 1.0, 0.1) == (6, [1.0] * 4) and calls == [0, 2, 4, 6]
    assert prune_search(5, 1, lambda n: 1.0 - n, 0.1) == (0, [1.0, 0.0])


def _constant_layer4(values):
    """A width-4 ResNet18 whose layer4 outputs ``values[c]`` in channel c for every input (layer4.0 outputs 0)."""
    torch.manual_seed(0)
    model = resnet18(10, 4)
    with torch.no_grad():
        for bn in (model.layer4[0].bn2, model.layer4[0].shortcut[1], model.layer4[1].bn2):
            bn.weight.zero_()
            bn.bias.zero_()
        model.layer4[1].bn2.bias.copy_(values)
    return model.eval()


def test_fineprune_prunes_in_increasing_mean_activation_and_restores_the_refused_step():
    values = torch.randperm(32, generator=torch.Generator().manual_seed(3)).float() + 1  # channel c: mean values[c]
    model = _constant_layer4(values)
    images = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(mean_activation(model, "layer4", images), values)
    order = torch.argsort(values)
    decisive = int(order[3])  # the 4th least active channel alone makes class 0: pruning it changes every answer
    with torch.no_grad():
        model.linear.weight.zero_()
        model.linear.weight[0, decisive] = 1.0
        model.linear.bias.zero_()
        model.linear.bias[1] = 0.5
    student = copy.deepcopy(model).requires_grad_(True)
    result = _defense("fineprune", model, images).prepare(student)
    assert result["fp_channels"] == 32 and result["fp_pruned"] == 3  # step: ceil(1% of 32) = 1
    assert result["fp_pruned_channels"] == order[:3].tolist() and result["fp_agreement"] == [1.0, 1.0, 1.0, 1.0, 0.0]
    kept = torch.ones(32, dtype=torch.bool)
    kept[order[:3]] = False
    assert (student.linear.weight[:, ~kept] == 0).all()
    assert torch.equal(student.linear.weight[:, kept], model.linear.weight[:, kept])  # the refused step undone
    result = _defense("fineprune", model, images, ["--fp_step", "0.1"]).prepare(copy.deepcopy(model))
    assert result["fp_pruned"] == 0 and result["fp_agreement"] == [1.0, 0.0]  # ceil(3.2) = 4 at once: refused


def test_fineprune_masks_an_earlier_group_through_the_layers_that_read_it():
    torch.manual_seed(0)
    model = resnet18(10, 4).eval()
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    student = copy.deepcopy(model).requires_grad_(True)
    result = _defense("fineprune", model, images, ["--fp_layer", "layer3", "--fp_max_drop", "1"]).prepare(student)
    off = result["fp_pruned_channels"]
    assert result["fp_channels"] == 16 and result["fp_pruned"] == 15 and len(off) == 15
    assert (student.layer4[0].conv1.weight[:, off] == 0).all() and (student.layer4[0].shortcut[0].weight[:, off] == 0).all()


# ---------------------------------------------------------------- end to end

def _teacher_dir(path, model):
    os.makedirs(path)
    mask = torch.zeros(1, 32, 32)
    mask[:, -6:, -6:] = 0.3
    write_teacher(path, model, torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)), mask)
    return str(path)


def _load(path):
    model = resnet18(10, 4)
    model.load_state_dict(torch.load(path, weights_only=True)[0])  # a plain ResNet18
    return model.eval()


def test_clp_end_to_end_and_epoch_zero_reports_clp_alone(tmp_path):
    teacher = _teacher_dir(tmp_path / "teacher", _teacher_with_outlier())
    out = tmp_path / "clp0"
    flags = fast_flags(teacher, out, epochs=0) + ["--defense", "clp", "--no_progress"]
    results = distri.main(flags)
    assert results["clp_pruned"]["layer4.1.bn2"] == 1 and len(results["clp_pruned"]) == 20
    assert results["clp_pruned_total"] == sum(results["clp_pruned"].values())
    assert results["best_epoch"] is None and results["epochs_run"] == 0
    assert {k: results[k] for k in ("acc", "asr", "ra")} == {k: results["student_init"][k] for k in ("acc", "asr", "ra")}
    assert read_json(out / "results.json")["clp_pruned_total"] == results["clp_pruned_total"]
    assert read_json(out / "args.json")["clp_u"] == 3.0
    bn = _load(out / "selected.pkl").layer4[1].bn2
    assert bn.weight[7] == 0 and bn.bias[7] == 0

    out = tmp_path / "clp2"
    results = distri.main(fast_flags(teacher, out, epochs=2) + ["--defense", "clp", "--no_progress", "--opt_lr", "0.05"])
    assert results["epochs_run"] == 2 and results["clp_pruned"]["layer4.1.bn2"] == 1
    for f in ("selected.pkl", "checkpoint.pkl"):
        bn = _load(out / f).layer4[1].bn2
        assert bn.weight[7] == 0 and bn.bias[7] == 0


def test_fineprune_end_to_end_and_the_saved_student_reloads_with_the_mask(teacher_dir, tmp_path):
    out = tmp_path / "fp"
    results = distri.main(fast_flags(teacher_dir, out, epochs=2)
                          + ["--defense", "fineprune", "--no_progress", "--fp_max_drop", "1.0"])
    assert results["fp_channels"] == 32 and results["fp_pruned"] == 31 and len(results["fp_agreement"]) == 32
    assert results["fp_agreement"][0] == 1.0  # the student starts as the teacher
    saved = read_json(out / "results.json")
    assert saved["fp_pruned_channels"] == results["fp_pruned_channels"]
    args = read_json(out / "args.json")
    assert (args["fp_step"], args["fp_max_drop"], args["fp_layer"], args["opt_lr"]) == (0.01, 1.0, "layer4", 0.01)
    off = results["fp_pruned_channels"]
    teacher = torch.load(os.path.join(teacher_dir, "checkpoint.pkl"), weights_only=True)[0]
    assert (teacher["linear.weight"][:, off] != 0).all()
    for f in ("selected.pkl", "checkpoint.pkl"):
        model = _load(out / f)
        assert (model.linear.weight[:, off] == 0).all()
        x = torch.rand(4, 3, 32, 32)
        noise = torch.zeros(1, 32, 1, 1)
        noise[:, off] = 5.0
        hook = model.layer4.register_forward_hook(lambda m, i, o: o + noise)  # the pruned channels are not read
        try:
            noisy = model(x)
        finally:
            hook.remove()
        torch.testing.assert_close(noisy, model(x))
