"""Fine-Pruning (RAID 2018) on unlabelled defense images, stepped as BackdoorBench's ``defense/fp.py``; then KD.

1. Each channel's mean activation at ``--fp_layer``'s output (layer4: the last residual group after its ReLU,
   averaged over space and over the defense images: the features the linear layer reads, where
   BackdoorBench hooks), of the student (the teacher's copy) in eval mode.
2. Channels are pruned in increasing order of it, ``ceil(--fp_step x channels)`` more per step (at least one;
   never all), and after each step the pruned student's agreement with the teacher's predicted classes
   (argmax) on the defense images is measured. Pruning stops before the first step whose agreement is more
   than ``--fp_max_drop`` (absolute) below the unpruned student's. BackdoorBench stops on a 10% relative drop
   of the clean *test* accuracy, which a defender holding only unlabelled out-of-distribution images cannot
   measure; agreement with the teacher on those images stands in for it.
3. KD (``--defense kd``'s engine and flags) with the mask kept. A channel is masked by zeroing the input
   columns of every layer that reads it (layer4: ``linear.weight[:, c]``, the weight BackdoorBench masks;
   layer1-3: the next group's first conv1 and shortcut convolution), written back to 0 after every optimiser
   step (``clp.ZeroHold``): every saved state dict is a plain ResNet18 with those channels off.

Defaults: BackdoorBench's fine-tuning (``config/defense/fp/cifar10.yaml``: SGD lr 0.01, momentum 0.9, weight
decay 5e-4, cosine, 100 epochs, batch 256), with the package's KD in place of its cross-entropy on labels.
results.json: ``fp_pruned``, ``fp_channels``, ``fp_pruned_channels`` and ``fp_agreement`` (unpruned first,
then one per step measured: when pruning stopped on the drop, the last is the step refused).
"""
import math

import torch

from helper.defenses.asd import KD
from helper.defenses.base import register_defense
from helper.defenses.clp import PrunedKD, ZeroHold
from helper.run.cli import UNIT, Option, Range
from helper.run.system import eval_batch_size
from helper.train.evaluate import eval_mode, predict


def readers(model, layer):
    """The weights whose input channels (dim 1) are ``layer``'s output channels: zeroing those columns masks them."""
    if layer == "layer4":
        return [model.linear.weight]
    block = getattr(model, f"layer{int(layer[-1]) + 1}")[0]
    return [block.conv1.weight, block.shortcut[0].weight]


@torch.no_grad()
def mean_activation(model, layer, images, batch_size=1000, amp=None):
    """Each channel of ``layer``'s output averaged over space and ``images`` (the model as it is: eval it first)."""
    sums = []
    hook = dict(model.named_modules())[layer].register_forward_hook(
        lambda m, i, out: sums.append(out.float().mean((2, 3)).sum(0)))
    try:
        predict(model, images, batch_size, amp)
    finally:
        hook.remove()
    return torch.stack(sums).sum(0) / len(images)


def step_size(n_channels, share):
    return max(1, math.ceil(round(n_channels * share, 9)))  # round: 300 x 0.01 is 3.0000000000000004


def prune_search(n_channels, step, agreement, max_drop):
    """Prune ``step``, 2 ``step``, ... (fewer than ``n_channels``) channels while ``agreement(n)`` stays within
    ``max_drop`` of ``agreement(0)``: (the last n kept, [agreement(0), agreement(step), ...] as measured)."""
    history, n = [agreement(0)], 0
    for k in range(step, n_channels, step):
        history.append(agreement(k))
        if history[0] - history[-1] > max_drop:
            break
        n = k
    return n, history


@register_defense
class FinePrune(PrunedKD):
    name = "fineprune"
    label = "Fine-Pruning"
    help = ("Fine-Pruning: mask the least active channels of the last group while the student agrees with the "
            "teacher on the defense images, then KD with the mask kept")
    defaults = {**KD.defaults, "opt_lr": 0.01, "weight_decay": 5e-4, "lr_schedule": "cosine", "epoch": 100,
                "batch_size": 256, "lr_drop": "off"}

    options = (
        Option("--fp_layer", "layer4", "the residual group whose output channels are pruned (layer4: what the linear "
               "layer reads)", type=str, choices=("layer1", "layer2", "layer3", "layer4")),
        Option("--fp_step", 0.01, "share of the channels pruned per step (>= 1 channel)", range=Range(0, 1, low_open=True)),
        Option("--fp_max_drop", 0.1, "stop before the step whose agreement with the teacher's labels on the defense "
               "images is more than this below the unpruned student's", range=UNIT),
    )

    def prune(self, student):
        a, c, images = self.args, self.config, self.images
        batch = eval_batch_size(self.device, a.eval_batch_size)
        with eval_mode(student, self.teacher):
            order = torch.argsort(mean_activation(student, c.fp_layer, images, batch, self.amp), stable=True)
            weights = readers(student, c.fp_layer)
            originals = [w.detach().clone() for w in weights]
            labels = predict(self.teacher, images, batch, self.amp)

            def masks(n):
                off = torch.zeros(len(order), dtype=torch.bool, device=order.device)
                off[order[:n]] = True
                return [off.view(1, -1, *[1] * (w.dim() - 2)).expand_as(w) for w in weights]

            @torch.no_grad()
            def mask(n):  # the n least active channels masked, and no others
                for w, w0, m in zip(weights, originals, masks(n)):
                    w.copy_(w0.masked_fill(m, 0.0))

            def agreement(n):
                mask(n)
                return (predict(student, images, batch, self.amp) == labels).float().mean().item()
            n, history = prune_search(len(order), step_size(len(order), c.fp_step), agreement, c.fp_max_drop)
            mask(n)  # undoes the refused step
        self.hold = ZeroHold(list(zip(weights, masks(n))))
        return {"fp_pruned": n, "fp_channels": len(order), "fp_pruned_channels": order[:n].tolist(),
                "fp_agreement": history}
