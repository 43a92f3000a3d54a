"""Speed measurements behind ``bench.py``: step throughput, evaluation throughput, a per-epoch time profile.

Every number is steady state: warm-up batches first (cuDNN autotuning, allocator, compile), then a timed
stretch that ends with one device sync. The timed stretch of our loop is an engine epoch (``run_epoch``),
so the figure includes batching, augmentation and the epoch's single host sync.
"""
import copy
import time
from collections import OrderedDict

import torch

from helper.data import images as D
from helper.defenses import DEFENSES
from helper.defenses.asd import Distiller
from helper.defenses.options import defense_parser
from helper.jobs.reference import reference_loader
from helper.run.system import autocast
from helper.train.engine import image_epoch
from helper.train.evaluate import EvalSet, evaluate
from models import resnet18

# Loss weights of a step that computes both losses (epoch 10 of the ASD schedule: 0.9 * 10, 0.1 * 10).
ASD_WEIGHTS = (9.0, 1.0)
KD_WEIGHTS = (1.0, 0.0)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def models(width, device, mem_format, seed=0):
    """A random-weight teacher and a student copied from it (as ``--using_checkpoint 1`` does)."""
    torch.manual_seed(seed)
    teacher = resnet18(10, width).to(device, memory_format=mem_format)
    student = copy.deepcopy(teacher)
    return teacher, student


def make_distiller(teacher, student, amp, compile_losses, lr=1e-3):
    optimizer = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9)
    return Distiller(teacher, student, optimizer, ["layer*.*.conv1"], amp=amp, compile_losses=compile_losses)


def train_one_epoch(distiller, images, weights, batch_size, generator, mem_format):
    """One epoch of the defense's loop (``helper.train.engine.image_epoch``) with fixed loss weights; its means."""
    distiller.student.train()
    return image_epoch(lambda x: distiller.step(x, *weights), images, batch_size, generator, mem_format, False)


def loop_throughput(distiller, images, warmup_images, weights, batch_size, mem_format, seed=0):
    """Images per second of an epoch of the engine over ``images`` after an epoch over ``warmup_images``."""
    generator = torch.Generator(device=images.device).manual_seed(seed)
    train_one_epoch(distiller, warmup_images, weights, batch_size, generator, mem_format)
    sync(images.device)
    start = time.perf_counter()
    train_one_epoch(distiller, images, weights, batch_size, generator, mem_format)
    sync(images.device)
    return len(images) / (time.perf_counter() - start)


def defense_throughput(name, teacher, images, warmup_images, batch_size, mem_format, amp, seed=0, flags=()):
    """Images per second of an epoch of ``--defense name``'s own step (its defaults and ``flags``) over ``images``,
    after an epoch over ``warmup_images``; the student is a fresh copy of ``teacher``. A defense's one-off
    set-up (``prepare`` and ``stages``: Neural Cleanse's inversion, ibau's mask trigger on the teacher) is not in the
    figure: ``(images/s, seconds of set-up)``."""
    argv = ["--defense", name, "--seed", str(seed), *flags]
    args = defense_parser(argv).parse_args(argv)
    student = copy.deepcopy(teacher).requires_grad_(True)
    defense = DEFENSES[name](args, teacher, images.device, amp, len(images), images)
    start = time.perf_counter()
    defense.prepare(student)
    step = defense.stages(student)[0].step
    prepare_s = time.perf_counter() - start
    generator = torch.Generator(device=images.device).manual_seed(seed)
    student.train()
    image_epoch(step, warmup_images, batch_size, generator, mem_format, False)
    sync(images.device)
    start = time.perf_counter()
    image_epoch(step, images, batch_size, generator, mem_format, False)
    sync(images.device)
    defense.close()
    return len(images) / (time.perf_counter() - start), prepare_s


def reference_throughput(step, images, warmup_steps, steps, batch_size, device, num_workers=2, seed=0):
    """Images per second of the public-code-style step fed by its DataLoader (workers already started)."""
    loader = iter(reference_loader(images, batch_size, num_workers, seed))
    for _ in range(warmup_steps):
        x, _ = next(loader)
        step.step(x.to(device), *ASD_WEIGHTS)
    sync(device)
    start, n = time.perf_counter(), 0
    for _ in range(steps):
        x, _ = next(loader)
        step.step(x.to(device), *ASD_WEIGHTS)  # .item() inside: a host sync per step, as the public code
        n += len(x)
    sync(device)
    return n / (time.perf_counter() - start)


def eval_throughput(model, eval_set, batch_size, amp, mem_format, repeats=2):
    """Images per second (clean + triggered) of ``evaluate``, best of ``repeats`` after one warm-up call."""
    evaluate(model, eval_set, batch_size, amp, mem_format)
    best = 0.0
    for _ in range(repeats):
        sync(eval_set.clean.device)
        start = time.perf_counter()
        evaluate(model, eval_set, batch_size, amp, mem_format)  # ends in one host sync
        best = max(best, 2 * len(eval_set.labels) / (time.perf_counter() - start))
    return best


def synthetic_eval_set(n, device, seed=0):
    """``n`` synthetic task test images with a fixed 6x6 corner trigger, blended once on the device."""
    split = D.synthetic_split("task", n, "test", seed)
    pattern = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(1, 32, 32)
    mask[:, -6:, -6:] = 0.3
    return EvalSet.build(split, pattern, mask, 0, device)


def profile_epoch(distiller, images, eval_set, batch_size, weights, mem_format, eval_batch_size=1000, seed=0):
    """Seconds per phase of one epoch of the real step, timed phase by phase with a device sync after each.

    The syncs make the phases add up to slightly more than an unprofiled epoch. ``asl`` is the ASL forward,
    which also computes its gradient (its backward scales it in place, inside ``backward``).
    """
    device = images.device
    kd_weight, asl_weight = weights
    times = OrderedDict((k, 0.0) for k in ("data", "teacher_forward", "student_forward", "kd_loss", "asl",
                                           "backward", "optimizer", "evaluation"))
    generator = torch.Generator(device=device).manual_seed(seed)
    d, student = distiller, distiller.student
    student.train()
    d.t_hooks.enabled = d.s_hooks.enabled = asl_weight != 0

    def lap(key, start):
        sync(device)
        now = time.perf_counter()
        times[key] += now - start
        return now

    sync(device)
    t = time.perf_counter()
    for x, _ in D.augmented_batches(images, batch_size, generator, mem_format, progress=False):
        t = lap("data", t)
        with autocast(device, d.amp):
            with torch.no_grad():
                t_logits = d.teacher(x)
            t = lap("teacher_forward", t)
            s_logits = student(x)
        t = lap("student_forward", t)
        loss = kd_weight * d.kd_fn(s_logits, t_logits, d.temperature, d.kd_reduction)
        t = lap("kd_loss", t)
        if asl_weight != 0:
            loss = loss + asl_weight * d.hooked_asl()
            t = lap("asl", t)
        d.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t = lap("backward", t)
        d.optimizer.step()  # optimizer_step split in two, to time backward and the update apart
        t = lap("optimizer", t)
    evaluate(student, eval_set, eval_batch_size, d.amp, mem_format)
    lap("evaluation", t)
    return times
