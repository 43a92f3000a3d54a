"""The re-tuning attack on a defended model (``distri.py --retune``).

"Uncovering, Explaining, and Mitigating the Superficial Safety of Backdoor Defense" (NeurIPS 2024; public code
AISafety-HKUST/stable_backdoor_purification, ``fine_tune/ft_poison.py``): fine-tune the purified model with
cross-entropy on 2% of the clean training set (1,000 CIFAR-10 images), 5 of them replaced by triggered images
labelled as the target; all layers, SGD lr 0.01, momentum 0.9, batch 128, 5 epochs; then measure the ASR again. A
defense that removed the backdoor keeps a low ASR; one that only hid it sees it come back.

Here the labelled set is a fixed seeded subset of ``--dataset``'s training split (``helper.data.inputs.retune_set``); the poisoned
images are its first ``n_poison`` non-target images in that order, stamped with the run's trigger (``--trigger_dir``'s
when given) after crop+flip, as ``helper.attacks.poison`` poisons its training sets, so they carry exactly the trigger the
ASR is measured with (the public code stores its poisoned images and does not augment them). The model given is
copied; it is never changed.
"""
import copy
import time

import torch

from helper.attacks.poison import labelled_batches, poisoned_step
from helper.train.engine import run_epoch
from helper.train.evaluate import evaluate


def retune(model, data, stamp, pattern, mask, epochs=5, lr=0.01, momentum=0.9, batch_size=128, seed=0, amp=None,
           memory_format=torch.contiguous_format, progress=False):
    """``(a re-tuned copy of model, the mean cross-entropy of each epoch)``.

    Per epoch, one augmented pass over ``data`` (uint8 images, labels) in batches of a permutation drawn from its own
    generator (``seed``: the run's generators are left alone), a step of ``CE(model(x'), y)`` per batch, ``x'`` the
    batch with the ``stamp``-flagged images triggered (``helper.attacks.poison.poisoned_step``); SGD without weight decay.
    """
    tuned = copy.deepcopy(model).requires_grad_(True)
    device = next(tuned.parameters()).device
    optimizer = torch.optim.SGD(tuned.parameters(), lr=lr, momentum=momentum)
    images, labels, stamp = data.x.to(device), data.y.to(device), stamp.to(device)
    pattern, mask = pattern.to(device), mask.to(device)
    generator = torch.Generator(device=device).manual_seed(seed)

    def step(x, y, s):
        return {"ce": poisoned_step(tuned, optimizer, x, y, s, pattern, mask, amp)}
    losses = [run_epoch(step, labelled_batches(images, labels, stamp, batch_size, generator, memory_format, progress,
                                               "retune batches"))["ce"] for _ in range(epochs)]
    return tuned.eval(), losses


def retune_results(model, data, stamp, pattern, mask, eval_set, args, amp=None, memory_format=torch.contiguous_format,
                   eval_kw=None, out=print):
    """Re-tune a copy of ``model`` with the run's ``--retune_*`` flags, evaluate it and print one line; the
    ``retune_*`` entries of results.json."""
    start = time.time()
    tuned, losses = retune(model, data, stamp, pattern, mask, args.retune_epochs, args.retune_lr, args.retune_momentum,
                           args.retune_batch, args.seed, amp, memory_format, progress=not args.no_progress)
    m = evaluate(tuned, eval_set, **(eval_kw or {}))
    out(f"re-tuned ({len(data)} images, {int(stamp.sum())} triggered, {args.retune_epochs} epochs): "
        f"acc {m['acc']:.4f}  asr {m['asr']:.4f}  asr_nontarget {m['asr_nontarget']:.4f}  ra {m['ra']:.4f}")
    return {"retune_acc": m["acc"], "retune_asr": m["asr"], "retune_asr_nontarget": m["asr_nontarget"],
            "retune_ra": m["ra"], "retune_ce": losses, "retune_n_images": len(data),
            "retune_n_poisoned": int(stamp.sum()), "retune_time_s": round(time.time() - start, 2)}
