"""CLP, Channel Lipschitzness-based Pruning (ECCV 2022): data-free, as its public code's ``CLP`` does it; then KD.

Every ``BatchNorm2d`` is paired with the last ``Conv2d`` before it in module order, as the public code pairs
them (in the ResNet18: the stem, both convolutions of every block and the shortcut convolutions). Output
channel k's upper bound of its Lipschitz constant is the largest singular value of
``conv.weight[k].reshape(in_channels, kh*kw) * |gamma_k / sqrt(running_var_k)|``, without batch-norm's eps
as there. A channel whose bound exceeds ``mean + u * std`` of its layer's bounds (torch's unbiased std, as
there) gets batch-norm weight and bias 0: it outputs 0 whatever its input. u = 3, its default and the
paper's CIFAR value. results.json: ``clp_pruned`` (channels per batch-norm layer), ``clp_pruned_total``;
``student_init`` is the pruned student.

The public code stops there: no data, no training. Here the usual KD follows (``--defense kd``'s engine and
flags; ``--ratio_type scheduler`` runs ASD after CLP), and the pruned channels stay pruned: their weight
and bias are written back to 0 after every optimiser step (``ZeroHold``), so every saved state dict is a plain
ResNet18 with those channels off. ``--epoch 0`` (or ``--opt_lr 0``) reports CLP alone. With
``--using_checkpoint 0`` CLP prunes the fresh student, which is no defense.
"""
import torch

from helper.defenses.asd import KD
from helper.defenses.base import register_defense
from helper.run.cli import Option


class ZeroHold:
    """Holds chosen entries of parameters at 0: at once, and after every step of the optimiser it is attached to.

    The entries are written, not their gradients masked, so it is exact for any optimiser (momentum, Adam, weight
    decay), and the saved state dict carries the zeros: it loads into a plain model with the pruning in effect.
    """

    def __init__(self, entries):
        self.entries, self.handle = entries, None  # [(parameter, bool mask of its entries held at 0)]
        self.apply()

    @torch.no_grad()
    def apply(self):
        for p, mask in self.entries:
            p.masked_fill_(mask, 0.0)

    def attach(self, optimizer):
        self.handle = optimizer.register_step_post_hook(lambda *_: self.apply())

    def remove(self):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def conv_bn_pairs(model):
    """``[(batch-norm name, conv, bn)]``: each ``BatchNorm2d`` with the last ``Conv2d`` before it in module order."""
    pairs, conv = [], None
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            conv = m
        elif isinstance(m, torch.nn.BatchNorm2d) and conv is not None and conv.out_channels == m.num_features:
            pairs.append((name, conv, m))
    return pairs


@torch.no_grad()
def channel_lipschitz(conv, bn):
    """Each output channel's upper bound of its Lipschitz constant through ``conv`` and ``bn``: (out_channels,)."""
    w = conv.weight.float().flatten(2)  # (out, in, kh*kw): channel k's matrix is weight[k].reshape(in, -1)
    return torch.linalg.matrix_norm(w, ord=2) * (bn.weight.float() / bn.running_var.float().sqrt()).abs()


def clp_masks(model, u=3.0):
    """``{batch-norm name: bool mask of the channels CLP prunes}``: bound > mean + u * std of the layer's bounds."""
    masks = {}
    for name, conv, bn in conv_bn_pairs(model):
        bounds = channel_lipschitz(conv, bn)
        masks[name] = bounds > bounds.mean() + u * bounds.std()
    return masks


class PrunedKD(KD):
    """KD (``--defense kd``) of a student pruned by ``prune(student)``, which sets ``self.hold`` (held during KD)
    and returns the dict for results.json."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.hold = None  # the pruned weights held at 0 (``ZeroHold``), made by prune()

    def prepare(self, student):
        return {**super().prepare(student), **self.prune(student)}

    def stages(self, student):
        stages = super().stages(student)
        self.hold.attach(stages[-1].optimizer)
        return stages

    def close(self):
        if self.hold is not None:
            self.hold.remove()
        super().close()


@register_defense
class CLP(PrunedKD):
    name = "clp"
    label = "CLP"
    help = ("CLP: zero the channels whose Lipschitz upper bound is an outlier of their layer (data-free), then KD "
            "with them kept at 0")
    defaults = dict(KD.defaults)

    options = (Option("--clp_u", 3.0, "a channel is pruned when its Lipschitz upper bound > mean + u * std of its "
                      "layer's"),)

    def prune(self, student):
        masks = clp_masks(student, self.config.clp_u)
        modules = dict(student.named_modules())
        self.hold = ZeroHold([(p, m) for name, m in masks.items() for p in (modules[name].weight, modules[name].bias)])
        counts = {name: int(m.sum()) for name, m in masks.items()}
        return {"clp_pruned": counts, "clp_pruned_total": sum(counts.values())}
