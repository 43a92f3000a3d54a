"""The benchmark behind bench.py (its docstring says what is measured): the parser and the measurements, in
the order of the report; the timed loops themselves are ``helper.jobs.profile``.
"""
import argparse
import json
import os
import platform

import torch

from helper.data import images as D
from helper.jobs import profile as P
from helper.jobs.auto import EVAL_MODE, RECIPE, TRAIN_MODE
from helper.jobs.reference import ReferenceStep
from helper.run.cli import add_system_args
from helper.run.system import amp_dtype, configure, eval_batch_size, memory_format, select_device, tf32_off, use_compile


# timed rows that are a defense with flags of its own: (defense, flags)
VARIANTS = {"ibau-target": ("ibau", ["--adv_search", "teacher", "--adv_target", "0"]),
            "ibau-target-every4": ("ibau", ["--adv_search", "teacher", "--adv_target", "0", "--adv_every", "4"]),
            "auto": ("ibau", [*RECIPE, "--adv_target", "0", *TRAIN_MODE]),  # what --defense auto runs on a flagged class 0
            "auto-eval": ("ibau", [*RECIPE, "--adv_target", "0", *EVAL_MODE])}  # ... on defense images far from the
# teacher's data (helper/jobs/auto.py: the student in eval mode)


def get_args_parser():
    p = argparse.ArgumentParser(description="bench.py: images per second of the ASD loop, plain KD, the "
                                            "public-code-style step and evaluation", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("Benchmark")
    g.add_argument("--width", type=int, default=None, help="ResNet18 base width; default 64 on a GPU, 16 on a CPU")
    g.add_argument("--batch_size", type=int, default=128, help="images per training step")
    g.add_argument("--steps", type=int, default=20, help="timed training steps per measurement")
    g.add_argument("--warmup", type=int, default=3, help="untimed steps before each measurement")
    g.add_argument("--rounds", type=int, default=3, help="alternating repetitions of the ASD and KD measurements")
    g.add_argument("--eval_images", type=int, default=2000,
                   help="clean test images (as many triggered ones are evaluated too); 10000 is the real test set")
    g.add_argument("--workers", type=int, default=2, help="DataLoader workers of the reference-style loop")
    g.add_argument("--no_reference", action="store_true", help="skip the reference-style loop")
    g.add_argument("--defenses", nargs="*", default=["ibau", "ibau-target", "ibau-target-every4", "auto", "sau", "nc"],
                   metavar="NAME",
                   help="unlearning defenses whose own step is timed beside KD's (their defaults; nc's one-off "
                        "inversion is timed apart, per pass over its images for the 10 classes); a name of VARIANTS "
                        "is a defense with flags (ibau-target: ibau searching the teacher towards class 0; -every4: climbing on "
                        "every 4th step; auto: --defense auto's recipe for a flagged class 0, its set-up the mask trigger's inversion on the teacher, which it repeats on the student every 2 epochs; auto-eval: the same in eval mode, auto's choice on far defense images); none: "
                        "--defenses with no name")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--json", default=None, metavar="FILE", help="write the results to this JSON file")
    g = p.add_argument_group("Profile")
    g.add_argument("--profile", action="store_true", help="also time one epoch phase by phase (data, forwards, "
                                                          "losses, backward, optimizer, evaluation)")
    g.add_argument("--profile_images", type=int, default=5000, help="defense images of the profiled epoch")
    g.add_argument("--profile_eval_images", type=int, default=10000,
                   help="clean test images evaluated at the end of the profiled epoch (as many triggered ones too)")
    add_system_args(p)
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    eval_bs = eval_batch_size(device, args.eval_batch_size)
    configure(device, args.seed, args.deterministic)
    amp, fmt = amp_dtype(device, args.amp), memory_format(device)
    compiled = use_compile(device, args.compile)
    width = args.width or (64 if device.type == "cuda" else 16)
    bs, steps, warmup = args.batch_size, args.steps, args.warmup
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {os.cpu_count()} cores"
    print(f"device {device} ({name}), torch {torch.__version__}, width {width}, batch {bs}, "
          f"{'fp32' if amp is None else str(amp).replace('torch.', '')} (ASD: fp32"
          f"{', TF32 off' if device.type == 'cuda' else ''}), compile {'on' if compiled else 'off'}")

    images = D.synthetic_split("ood", (steps + warmup) * bs, "train", args.seed).x
    timed, warm = images[:steps * bs].to(device), images[steps * bs:].to(device)
    teacher, student = P.models(width, device, fmt, args.seed)
    peak = {}

    def measure(key, fn):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        value = fn()
        if device.type == "cuda":
            peak[key] = max(peak.get(key, 0), torch.cuda.max_memory_allocated(device) / 2 ** 30)
        return value

    amp_asd = amp_dtype(device, args.amp, needs_fp32=True)  # as an ASD run computes: fp32, TF32 off on CUDA
    asd = P.make_distiller(teacher, student, amp_asd, compiled)
    kd = P.make_distiller(teacher, P.models(width, device, fmt, args.seed)[1], amp, compiled)
    asd_img_s = kd_img_s = 0.0
    for r in range(args.rounds):
        with tf32_off(device):
            asd_img_s = max(asd_img_s, measure("asd", lambda: P.loop_throughput(asd, timed, warm, P.ASD_WEIGHTS, bs, fmt, r)))
        kd_img_s = max(kd_img_s, measure("kd", lambda: P.loop_throughput(kd, timed, warm, P.KD_WEIGHTS, bs, fmt, r)))
    asd.close()
    kd.close()

    defenses = {}
    for dname in args.defenses:
        base, own = VARIANTS.get(dname, (dname, []))
        img_s, prepare_s = measure(dname, lambda: P.defense_throughput(
            base, teacher, timed, warm, bs, fmt, amp, args.seed, ["--batch_size", str(bs), "--nc_passes", "1"]
            if base == "nc" else ["--batch_size", str(bs), *own]))
        defenses[dname] = {"img_s": img_s, "step_over_kd": kd_img_s / img_s, "prepare_s": prepare_s}

    reference_img_s = None
    if not args.no_reference:
        ref_teacher, ref_student = P.models(width, device, torch.contiguous_format, args.seed)
        ref = ReferenceStep(ref_teacher, ref_student, torch.optim.SGD(ref_student.parameters(), lr=1e-3, momentum=0.9))
        reference_img_s = measure("reference", lambda: P.reference_throughput(
            ref, images, warmup, steps, bs, device, args.workers, args.seed))
        ref.close()

    eval_set = P.synthetic_eval_set(args.eval_images, device, args.seed)
    eval_img_s = measure("eval", lambda: P.eval_throughput(student, eval_set, eval_bs, amp, fmt))

    # full precision: the ratios are exactly those of the throughputs beside them (the table below rounds)
    result = {"device": name, "torch": torch.__version__, "width": width, "batch_size": bs,
              "asd_img_s": asd_img_s, "kd_img_s": kd_img_s, "reference_img_s": reference_img_s,
              "eval_img_s": eval_img_s, "asd_over_kd": kd_img_s / asd_img_s,
              "speedup_vs_reference": None if reference_img_s is None else asd_img_s / reference_img_s,
              "defenses": defenses, "peak_gib": {k: round(v, 3) for k, v in peak.items()} or None}
    rows = [("(a) ASD step, ours", asd_img_s, "asd"), ("(b) plain-KD step, ours", kd_img_s, "kd"),
            ("(c) ASD step, public-code style", reference_img_s, "reference"),
            (f"(d) evaluation, clean + triggered ({2 * args.eval_images})", eval_img_s, "eval")]
    print(f"{'':44s} {'images/s':>10s}" + (f" {'peak GiB':>9s}" if peak else ""))
    for label, value, key in rows:
        if value is not None:
            print(f"{label:44s} {value:10.1f}" + (f" {peak.get(key, 0):9.2f}" if peak else ""))
    for dname, d in defenses.items():
        print(f"{'(e) ' + dname + ' step, ours':44s} {d['img_s']:10.1f}" + (f" {peak.get(dname, 0):9.2f}" if peak else "")
              + f"   {d['step_over_kd']:.2f} x a KD step" + (f"; its inversion {d['prepare_s']:.1f} s per pass" if dname == "nc" else
                 f"; its set-up {d['prepare_s']:.1f} s" if d["prepare_s"] >= 0.05 else ""))
    print(f"asd_over_kd (KD / ASD throughput) {result['asd_over_kd']:.3f}"
          + (f"   speedup_vs_reference {result['speedup_vs_reference']:.2f}x" if reference_img_s else ""))
    epoch_s = 5000 / asd_img_s + 2 * 10000 / eval_img_s
    print(f"extrapolated: one epoch on 5,000 images + evaluation of 2 x 10,000 = {epoch_s:.2f} s; "
          f"300 epochs = {300 * epoch_s / 60:.1f} min")

    if args.profile:
        prof_images = D.synthetic_split("ood", args.profile_images, "train", args.seed + 1).x.to(device)
        prof_eval = P.synthetic_eval_set(args.profile_eval_images, device, args.seed)
        d = P.make_distiller(teacher, P.models(width, device, fmt, args.seed)[1], amp, compiled)
        P.profile_epoch(d, warm, prof_eval, bs, P.ASD_WEIGHTS, fmt, eval_bs)  # warm-up
        times = P.profile_epoch(d, prof_images, prof_eval, bs, P.ASD_WEIGHTS, fmt, eval_bs)
        d.close()
        total = sum(times.values())
        print(f"profile of one ASD epoch: {args.profile_images} images, evaluation of 2 x {args.profile_eval_images} "
              f"(a sync after each phase): {total:.2f} s")
        for k, v in times.items():
            print(f"  {k:16s} {v:8.3f} s  {100 * v / total:5.1f} %")
        result["profile_s"] = {k: round(v, 4) for k, v in times.items()}

    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: result[k] for k in ("device", "torch", "width", "batch_size", "asd_img_s", "kd_img_s",
                                               "reference_img_s", "eval_img_s", "asd_over_kd",
                                               "speedup_vs_reference", "defenses")}, f, indent=1)
    return result
