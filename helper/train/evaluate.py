"""Clean accuracy and attack success rate on the teacher's test set (SPEC sections 1 and 7)."""
import contextlib
from dataclasses import dataclass

import torch

from helper.data.images import to_float
from helper.data.trigger import apply_trigger
from helper.run.system import autocast, tf32_off


@contextlib.contextmanager
def eval_mode(*models):
    """The models in eval mode inside the block; each one's train/eval mode restored after, also on an error."""
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


@dataclass
class EvalSet:
    """The test set held on the device: clean uint8 images, labels, and the triggered images blended once."""
    clean: torch.Tensor      # uint8 (N,3,32,32)
    labels: torch.Tensor     # int64 (N,)
    triggered: torch.Tensor  # float (N,3,32,32) in [0,1]
    target: int

    @classmethod
    def build(cls, split, pattern, mask, target, device, batch_size=2000):
        clean = split.x.to(device)
        pattern, mask = pattern.to(device), mask.to(device)
        triggered = torch.cat([apply_trigger(to_float(clean[i:i + batch_size]), pattern, mask)
                               for i in range(0, len(clean), batch_size)]) if len(clean) else clean.float()
        return cls(clean, split.y.to(device), triggered, int(target))


@torch.inference_mode()
def predict(model, images, batch_size=1000, amp=None, memory_format=torch.contiguous_format):
    """Predicted labels of a float or uint8 image tensor, in large batches, under inference mode."""
    device = images.device
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        x = to_float(x) if x.dtype == torch.uint8 else x
        with autocast(device, amp):
            out.append(model(x.contiguous(memory_format=memory_format)).argmax(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=device)


def evaluate(model, eval_set, batch_size=1000, amp=None, memory_format=torch.contiguous_format):
    """``{'acc', 'asr', 'asr_nontarget', 'ra', 'top_class_share', 'target_rate_clean', 'target_acc'}`` of a model,
    in eval mode, with one host sync. ``amp`` None (what every defense run uses): fp32 with TF32 off on CUDA, so every
    row of a table is measured at one precision whatever its training ran in.

    ``asr`` is the share of all triggered test images classified as the target (the paper's number, about 0.1 for
    a clean model); ``asr_nontarget`` leaves out the images whose label is the target (BackdoorBench's definition).
    ``ra``, robust accuracy, is the share of those triggered non-target images classified as their true label
    (BackdoorBench's ``test_ra``). ``top_class_share`` is the share of clean test images given the most common
    predicted class: 1.0 means a model that answers one class whatever its input (an ASR of 0 from such a model says
    nothing about a backdoor). ``target_rate_clean`` is the share of clean non-target images classified as the
    target: the bias an ASR is measured against (a vanished trigger scores ``asr_nontarget`` equal to it).
    ``target_acc`` is the accuracy on the clean images of the target class alone: what a defense that unlearns the
    target's shortcut takes from the class itself (0 when the test set has none of it).
    """
    fp32 = tf32_off(eval_set.clean.device) if amp is None else contextlib.nullcontext()
    with eval_mode(model), fp32:
        clean_pred = predict(model, eval_set.clean, batch_size, amp, memory_format)
        trig_pred = predict(model, eval_set.triggered, batch_size, amp, memory_format)
    hit = trig_pred == eval_set.target
    nontarget = eval_set.labels != eval_set.target
    top = torch.bincount(clean_pred).max() if len(clean_pred) else clean_pred.new_zeros(())
    counts = torch.stack([(clean_pred == eval_set.labels).sum(), hit.sum(), (hit & nontarget).sum(), nontarget.sum(),
                          top, ((clean_pred == eval_set.target) & nontarget).sum(),
                          ((trig_pred == eval_set.labels) & nontarget).sum(),
                          ((clean_pred == eval_set.target) & ~nontarget).sum()])
    correct, hits, hits_nt, n_nt, top, clean_to_target, robust, target_correct = counts.tolist()
    n = max(len(eval_set.labels), 1)
    n_target = len(eval_set.labels) - n_nt
    return {"acc": correct / n, "asr": hits / n, "asr_nontarget": hits_nt / max(n_nt, 1), "ra": robust / max(n_nt, 1),
            "top_class_share": top / n, "target_rate_clean": clean_to_target / max(n_nt, 1),
            "target_acc": target_correct / max(n_target, 1)}


def conv_weight_norm(model):
    """L2 norm of all convolution weights. ASL's gradient grows as 1/|s| and can inflate it many times over;
    behind batch-norm a larger norm means a smaller effective learning rate, so this explains slow recovery."""
    with torch.no_grad():
        norms = [m.weight.float().norm() ** 2 for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        return torch.stack(norms).sum().sqrt().item()
