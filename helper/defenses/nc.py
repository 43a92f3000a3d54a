"""Neural Cleanse (S&P 2019) as a KD defense: invert a trigger per class, flag the anomalous class, and distil
with its inverted trigger stamped on part of every batch and the teacher's clean answer as the target.

1. Before training, for every class, the smallest trigger of the package's family ``x (1 - m) + p m``
   (``m`` in [0, ``--nc_mask_max``], size ``||m||_1``) that sends ``--nc_success`` of the first ``--nc_images``
   defense images (unaugmented) to that class, on the teacher (``helper.train.perturb.minimal_trigger``: Adam 0.1,
   betas 0.5/0.9, cost 1e-3 adapted x2 up and /2^1.5 down, as its code; ``--nc_passes`` passes, patience 2).
2. Neural Cleanse's MAD anomaly index over the classes' mask norms; a class below the median with an index
   above ``--nc_threshold`` (2) is flagged, the smallest first. When none is, the run says so and is plain KD.
3. KD in which ``--nc_share`` (0.2, its ``unlearning_ratio``) of every batch carries the flagged class's
   trigger, while the target stays the teacher's answer on the clean image:
   ``KD(s(x'), t(x))``. With ``--nc_every E`` the flagged class's trigger is inverted again on the student
   every E epochs (warm-started), to follow what the student still reacts to.

Defaults otherwise the fine-tuning recipe of its unlearning (SGD 0.01, momentum 0.9, weight decay 5e-4,
cosine). Chosen here: ``--nc_success`` 0.9, not NC's 0.98 (the width-8 BadNets teacher's own trigger sends
0.96 of the test images to the target: a goal above a backdoor's own success makes its trigger no shortcut);
``--nc_passes`` 30 over 500 images (NC: 80 epochs over 5% of the training set): one pass over 500 images for
the 10 classes costs about one KD epoch on 5,000, so the inversion is about 30 KD epochs (bench.py).
"""
import torch
from tqdm import tqdm

from helper.data.images import to_float
from helper.defenses.base import FINE_TUNING, Defense, register_defense
from helper.run.cli import AT_LEAST_ONE, NONNEGATIVE, UNIT, Option, Range, check_options
from helper.run.errors import UserError
from helper.train.engine import optimizer_step
from helper.train.evaluate import eval_mode
from helper.train.perturb import (STATISTICS, THRESHOLDS, MaskPattern, anomaly_index, effect, flagged_classes, invert_all,
                                  minimal_trigger)


def stamp_share(x, share, family, params):
    """The batch with ``family``'s trigger on its first ``round(share * len(x))`` images (the batch order is
    already random)."""
    k = int(round(share * len(x)))
    if k == 0 or params is None:
        return x
    return torch.cat([family.apply(x[:k], params), x[k:]])


# scan.py's and --defense auto's --nc_images and --nc_batch: on the eight teachers of docs/experiments.md, 100 images
# in batches of 50 (the 60 Adam steps per class of 200 in batches of 100, at half the cost, about two KD epochs)
# separated them as well as 200 did
SCAN_IMAGES, SCAN_BATCH = 100, 50


def inversion_options(images=500, batch=100):
    """The inversion's flags, shared by ``--defense nc``, ``scan.py`` and ``--defense auto`` (``images``, ``batch``:
    the defaults of ``--nc_images`` and ``--nc_batch``)."""
    return (
        Option("--nc_images", images, "defense images the inversion runs on (unaugmented)", type=int, range=AT_LEAST_ONE),
        Option("--nc_passes", 30, "passes over them per class", type=int, range=AT_LEAST_ONE),
        Option("--nc_batch", batch, "batch size of the inversion", type=int, range=AT_LEAST_ONE),
        Option("--nc_success", 0.9, "share of the images a trigger must send to its class to count",
               range=Range(0, 1, low_open=True)),
        Option("--nc_mask_max", 1.0, "largest mask value of the inverted trigger", range=Range(0, 1, low_open=True)),
        Option("--nc_statistic", "ratio", "the anomaly index of a class's trigger size: ratio, the median size over "
               "it; mad, Neural Cleanse's MAD index; log_mad, the MAD index of the log sizes", type=str,
               choices=STATISTICS),
        Option("--nc_threshold", None, "anomaly index above which a class is flagged (default: 2.5 for ratio, 2 for "
               "mad and log_mad)", range=Range(0, low_open=True)),
        Option("--nc_stop", 0, "end a class's search once its goal is reached and this many passes have not shrunk "
               "its smallest trigger by 1%% (0: run every pass)", type=int, range=NONNEGATIVE),
    )


def add_inversion_args(g, images=500, batch=100):
    """Add ``inversion_options(images, batch)`` to the argument group ``g``."""
    for option in inversion_options(images, batch):
        option.add_to(g)


def inversion_kw(a):
    return dict(passes=a.nc_passes, batch_size=a.nc_batch, success=a.nc_success, stop=a.nc_stop)


def check_inversion(a):
    """The inversion's flags in range, one UserError naming the first that is not (before any folder is made)."""
    check_options(inversion_options(), a)
    if a.nc_threshold is not None and a.nc_statistic == "ratio" and not a.nc_threshold > 1:
        raise UserError(f"--nc_threshold must be above 1 for the ratio (a ratio of 1 is the median class itself), "
                        f"not {a.nc_threshold}")


def threshold_of(a):
    """The flagging threshold the flags amount to: ``--nc_threshold``, else its statistic's default."""
    return THRESHOLDS[a.nc_statistic] if a.nc_threshold is None else a.nc_threshold


@register_defense
class NC(Defense):
    name = "nc"
    label = "Neural Cleanse"
    help = ("Neural Cleanse during KD: invert a trigger per class, flag the anomalous class (MAD > 2), distil with "
            "its trigger stamped on part of each batch and the teacher's clean answer as the target")
    defaults = FINE_TUNING
    options = inversion_options() + (
        Option("--nc_share", 0.2, "share of every batch that carries the trigger", range=UNIT),
        Option("--nc_every", 0, "invert the flagged class's trigger again on the student every this many epochs "
               "(0: never)", type=int, range=NONNEGATIVE),
    )

    @classmethod
    def check(cls, args):
        check_inversion(args)
        super().check(args)

    def prepare(self, student):
        c = self.config
        self.family = MaskPattern(c.nc_mask_max)
        self.inv_images = to_float(self.images[:c.nc_images])
        with eval_mode(self.teacher):
            found = invert_all(lambda z: self.logits(self.teacher, z, input_grad=True), self.inv_images, self.family,
                               range(self.teacher.num_classes), **inversion_kw(c))
        norms = [f.size for f in found]
        index, median, mad = anomaly_index(norms, c.nc_statistic)
        flagged = flagged_classes(norms, threshold_of(c), c.nc_statistic)
        self.flagged = flagged[0] if flagged else None
        self.params = found[self.flagged].params if flagged else None
        tqdm.write("nc: mask L1 per class " + " ".join(f"{n:.1f}" for n in norms) + "; "
                   + (f"class {self.flagged} flagged (anomaly index {float(index[self.flagged]):.2f})" if flagged
                      else f"no class flagged (largest anomaly index {float(index.max()):.2f}): the run is plain KD"))
        return {"nc": {"mask_l1": norms, "success": [f.success for f in found], "reached": [f.reached for f in found],
                       "anomaly_index": index.tolist(), "median": median, "mad": mad, "flagged": flagged,
                       "unlearned_class": self.flagged}}

    def stages(self, student):
        a, c = self.args, self.config
        optimizer = self.optimizer(student.parameters())

        def begin(epoch):
            if self.params is not None and c.nc_every and epoch and epoch % c.nc_every == 0:
                with eval_mode(student):
                    self.params = minimal_trigger(lambda z: self.logits(student, z), self.inv_images, self.flagged,
                                                  self.family, params=self.params, **inversion_kw(c)).params
            return {}

        def step(x):
            t = self.logits(self.teacher, x)
            s = self.logits(student, stamp_share(x, c.nc_share, self.family, self.params))
            kd = self.kd(s, t)
            optimizer_step(optimizer, kd)
            return {"kd_loss": kd.detach()}
        return [self.make_stage("", a.epoch, student, optimizer, step, begin)]

    def diagnostics(self, model):
        """The base's dead units, and what the unlearned trigger does on the probe images to each model."""
        d = super().diagnostics(model)
        if self.images is None or self.params is None:
            return d
        x = self.probe()
        with eval_mode(model), torch.no_grad():
            xp = self.family.apply(x, self.params)
            m, _ = self.family.trigger(self.params)
            d["adv"] = {"teacher": effect(self.teacher, x, xp), "student": effect(model, x, xp),
                        "mask_l1": float(m.sum())}
        return d
