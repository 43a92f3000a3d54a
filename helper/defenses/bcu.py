"""BCU, Backdoor Cleansing with Unlabeled Data (CVPR 2023), as its public code does it (SPEC section 10).

Start from the teacher, re-initialise each weight element of every convolution and linear layer with a
per-layer probability (the element of a freshly initialised ResNet18 takes its place; batch-norm
parameters and statistics are kept), then distil with ``KL(softmax(t/T) || softmax(s/T))``, batch mean,
no T^2, at a temperature rising as ``T = 1 + 3 (epoch + 1) / epochs``; SGD lr 0.01, momentum 0.9, weight decay
5e-4, batch 256, cosine annealing with T_max 100 epochs whatever the run's length (its scheduler's), so a
20-epoch run ends at lr 0.01 (1 + cos(pi 19/100)) / 2 = 0.0091, not near 0.
"""
import torch

from helper.defenses.base import Defense, register_defense
from helper.run.cli import UNIT, Option, Range
from helper.train.losses import kd_loss
from helper.train.schedule import bcu_temperature
from models import resnet18

# Re-initialisation probability by the first part of the module name: stem, layer1-4, head.
PARTS = ("conv1", "layer1", "layer2", "layer3", "layer4", "linear")


def fresh_resnet18(num_classes, width, generator):
    """A freshly initialised ResNet18 as BCU draws it: Kaiming normal (fan_out, ReLU) convolutions, PyTorch's
    default linear layer."""
    model = resnet18(num_classes, width)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                std = (2.0 / (m.weight.shape[0] * m.weight[0, 0].numel())) ** 0.5
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * std)
            elif isinstance(m, torch.nn.Linear):
                bound = m.weight.shape[1] ** -0.5
                m.weight.copy_(torch.rand(m.weight.shape, generator=generator) * 2 * bound - bound)
                m.bias.copy_(torch.rand(m.bias.shape, generator=generator) * 2 * bound - bound)
    return model


@torch.no_grad()
def reinitialise_(model, ratios, generator):
    """Replace each weight/bias element of every Conv2d and Linear with probability ``ratios[part]`` by a fresh
    model's element; batch-norm untouched. Returns the share of elements replaced per part."""
    fresh = dict(fresh_resnet18(model.num_classes, model.width, generator).named_modules())
    replaced = {part: [0, 0] for part in ratios}
    for name, m in model.named_modules():
        if not isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            continue
        part = name.split(".")[0]
        for pname, p in m.named_parameters(recurse=False):
            pick = torch.rand(p.shape, generator=generator) < ratios[part]
            p.copy_(torch.where(pick.to(p.device), getattr(fresh[name], pname).to(p.device, p.dtype), p))
            replaced[part][0] += int(pick.sum())
            replaced[part][1] += pick.numel()
    return {part: k / max(n, 1) for part, (k, n) in replaced.items()}


@register_defense
class BCU(Defense):
    name = "bcu"
    label = "BCU"
    help = "BCU: re-initialise part of the teacher layer by layer, then distil at a rising temperature"
    defaults = {"opt_lr": 0.01, "weight_decay": 5e-4, "lr_schedule": "cosine", "lr_period": 100, "epoch": 100,
                "batch_size": 256, "lr_drop": "off"}

    options = (
        Option("--bcu_ratios", (0.01, 0.01, 0.03, 0.09, 0.27, 0.10), "re-initialisation probability of each weight "
               "element of stem conv1, layer1-4 and linear", nargs=6, metavar=("STEM", "L1", "L2", "L3", "L4", "HEAD"),
               range=UNIT),
        Option("--bcu_temperature", (1.0, 4.0), "T = START + (END - START) * (epoch + 1) / epochs", nargs=2,
               metavar=("START", "END"), range=Range(0, low_open=True)),
    )

    def prepare(self, student):
        ratios = dict(zip(PARTS, self.config.bcu_ratios))
        return {"bcu_reinit_share": reinitialise_(student, ratios, torch.Generator().manual_seed(self.args.seed))}

    def stages(self, student):
        a, c = self.args, self.config
        optimizer = self.optimizer(student.parameters())
        temperature = {}

        def begin(epoch):
            temperature["t"] = bcu_temperature(epoch, a.epoch, *c.bcu_temperature)
            return {"bcu_t": temperature["t"]}

        def loss(s, t, x):
            t_now = temperature["t"]
            kl = kd_loss(s, t, t_now, "batchmean") / t_now ** 2  # BCU: batch-mean KL without the T^2 factor
            return kl, {"bcu_kl": kl.detach()}
        step = self.distill_step(student, self.teacher, loss, optimizer)
        return [self.make_stage("", a.epoch, student, optimizer, step, begin)]
