"""The flag groups every entry script shares (Data, System, Output) and the argument types they use.

The parsers built from them: ``helper.defenses.options`` (distri.py), ``helper.attacks.options`` (adba.py),
``helper.jobs.scan`` (scan.py), ``helper.jobs.reproduce`` (reproduce.py), ``helper.jobs.bench`` (bench.py).
Names follow the public ASD code where it had them (``--finetunedata``, ``--opt_lr``, ``--epoch``, ...).
"""
import argparse
import json
import os
from dataclasses import dataclass

from helper.run.errors import UserError

TEMPERATURES = (0.05, 1000.0)  # KD temperatures a run accepts


def rate_value(text):
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], not {value}")
    return value


def eval_every_value(text):
    """``--eval_every``: a number of epochs, or ``auto`` (``helper.run.system.eval_every`` decides on the run's device)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number of epochs or auto, not {text!r}") from None


def add_system_args(parser):
    """Device, precision and seed: shared by every entry point, the attack and the benchmark too."""
    g = parser.add_argument_group("System")
    g.add_argument("--device", default="auto", help="auto (first CUDA GPU, else CPU), cpu, cuda or cuda:N")
    g.add_argument("--seed", type=int, default=0, help="seeds the subset, the augmentation and any fresh weights")
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp32"],
                   help="autocast precision of the forward passes; auto = bf16 on CUDA, fp32 on CPU. "
                        "Losses are always computed in fp32. No fp16: its gradients need a GradScaler, "
                        "which the engine does not have, and bf16 needs none")
    g.add_argument("--compile", nargs="?", const="on", default="auto", choices=["auto", "on", "off"],
                   help="fuse the losses with torch.compile (falls back to eager with a warning if compiling fails); "
                        "auto = on for CUDA, off on the CPU (slow to start there); --compile alone = on")
    g.add_argument("--eval_batch_size", type=int, default=None,
                   help="batch size of evaluation under inference mode; default 2000 on CUDA, 256 on CPU "
                        "(on a 2-core CPU 256 evaluated 1.6x faster than 1000)")
    g.add_argument("--deterministic", action="store_true",
                   help="the same kernels every time: on CUDA cuDNN's benchmark off and its deterministic mode on, "
                        "deterministic algorithms where torch has them (CUBLAS_WORKSPACE_CONFIG set), so a resumed "
                        "run equals the run made straight through on a GPU too; slower. Off: cuDNN picks its fastest "
                        "kernels")
    return g


def add_output_args(parser, resumable=True):
    """Where a run writes and how it reports: shared by the defense, the attack and (``resumable`` False: no
    ``--resume``) the scan."""
    g = parser.add_argument_group("Output")
    g.add_argument("--output_dir", default=None, help="run folder (default: a new folder under runs/); "
                                                     "a folder that already holds files is refused")
    g.add_argument("--msg", default="", help="a note for this run, kept in args.json and the folder name")
    g.add_argument("--no_progress", action="store_true", help="no tqdm bars (the JSON lines and epoch lines stay)")
    if not resumable:
        return g
    g.add_argument("--resume", action="store_true",
                   help="continue the stopped run in --output_dir from its last completed epoch (last.pt); "
                        "the other arguments must be those it was started with")
    g.add_argument("--checkpoint_every", type=int, default=1,
                   help="write last.pt (what --resume continues from) every this many epochs")
    return g


def add_synthetic_args(group):
    group.add_argument("--synthetic_seed", type=int, default=0,
                       help="defines the synthetic task (keep it equal between the attack and the defense)")
    group.add_argument("--synthetic_train", type=int, default=10000, help="images in a synthetic train split")
    group.add_argument("--synthetic_test", type=int, default=2000, help="images in a synthetic test split")


def add_data_args(parser, trigger=True):
    """The teacher folder, the teacher's dataset and the defense images: shared by distri.py and scan.py;
    ``trigger``: also the flags of the trigger an ASR is measured with (not scan.py's)."""
    g = parser.add_argument_group("Data")
    g.add_argument("--read_dir", default=None,
                   help="folder with checkpoint.pkl, pattern.pt and mask.pt; when not given, read_dir at the top of distri.py")
    g.add_argument("--dataset", default="cifar10",
                   help="what the teacher was trained on; its test set measures Acc and ASR: "
                        "cifar10, cifar100, synthetic or a path to an .npz file")
    g.add_argument("--finetunedata", default="cifar100",
                   help="unlabelled defense data: cifar10, cifar100, synthetic (out-of-distribution generator) or .npz")
    g.add_argument("--finetune_in_out", default="out", choices=["in", "out"],
                   help="out: defense data from --finetunedata; in: from the teacher's own training set")
    g.add_argument("--subset_rate", type=rate_value, default=0.1,
                   help="share of the defense pool used: 0.1 of CIFAR-100 train = 5,000 images, 1.0 = 50,000")
    g.add_argument("--defense_size", type=int, default=None,
                   help="exactly this many defense images (overrides --subset_rate): 5000, 50000, 60000 in the paper")
    g.add_argument("--finetune_extend", action="store_true",
                   help="pool = train + test of the defense data (60,000 for CIFAR-100); set by distri_dsextend.py")
    g.add_argument("--data_root", default="data", help="dataset root; CIFAR downloads land here")
    g.add_argument("--no_download", action="store_true", help="never try to download a missing dataset")
    if trigger:
        g.add_argument("--target_label", type=int, default=0, help="the backdoor's target class")
        g.add_argument("--thresh_mask", type=float, default=None, help="mask values <= this are set to 0 before use")
        g.add_argument("--trigger_dir", default=None,
                       help="measure ASR (and re-tune) with the trigger (pattern.pt, mask.pt) of this teacher folder "
                            "instead of --read_dir's own; needed for a clean teacher (adba.py --attack none), which has "
                            "none. The run folder then holds this trigger")
    add_synthetic_args(g)
    return g


def unit_value(text):
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], not {value}")
    return value


def nonneg_value(text):
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {value}")
    return value


@dataclass(frozen=True)
class Range:
    """The values a number flag accepts: ``low`` and ``high`` (None: unbounded), each included unless ``*_open``."""
    low: float = None
    high: float = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value):
        if value != value:  # NaN is in no range
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self):
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


POSITIVE, NONNEGATIVE, AT_LEAST_ONE, UNIT = Range(0, low_open=True), Range(0), Range(1), Range(0, 1)


@dataclass(frozen=True)
class Option:
    """One flag of a method, declared once: ``flag`` (its name; ``aliases``: older names that still parse), its
    ``default``, ``type``, ``choices``, ``metavar`` and ``nargs`` as argparse takes them (a tuple default of a
    ``nargs`` flag parses as a list; ``type=bool``: a switch, False unless given), and ``range`` (a ``Range``, of every value of a list), checked by
    ``check_options`` before a run makes its folder. ``None`` passes the range (an optional flag left unset)."""
    flag: str
    default: object
    help: str
    type: type = float
    range: Range = None
    choices: tuple = None
    aliases: tuple = ()
    metavar: object = None
    nargs: object = None

    @property
    def dest(self):
        return self.flag.lstrip("-")

    def add_to(self, group):
        kw = {"default": self.default, "help": self.help, "dest": self.dest}
        if self.type is bool:  # a switch: present = True
            group.add_argument(self.flag, *self.aliases, action="store_true", **kw)
            return
        if self.type is not str:
            kw["type"] = self.type
        for key in ("choices", "metavar", "nargs"):
            if getattr(self, key) is not None:
                kw[key] = list(getattr(self, key)) if key == "choices" else getattr(self, key)
        if self.nargs is not None and isinstance(self.default, tuple):
            kw["default"] = list(self.default)
        group.add_argument(self.flag, *self.aliases, **kw)


def add_options(group, options):
    """Each ``Option`` of ``options`` as a flag of the argparse ``group``."""
    for option in options:
        option.add_to(group)


def check_options(options, args):
    """A UserError naming the first flag of ``options`` whose value in ``args`` (each value of a list) is outside its
    range."""
    for o in options:
        value = getattr(args, o.dest, None)
        bad = [v for v in (value if isinstance(value, (list, tuple)) else [value]) if v is not None and v not in o.range] \
            if o.range is not None else []
        if bad:
            also = f" (also {', '.join(o.aliases)})" if o.aliases else ""
            where = f" (of {' '.join(f'{v:g}' for v in value)})" if isinstance(value, (list, tuple)) else ""
            raise UserError(f"{o.flag}{also} must be {o.range}, not {bad[0]}{where}")


def read_config(path):
    """``--config FILE``: a JSON object (``.json``) or a YAML mapping (``.yaml``/``.yml``, with PyYAML installed) of
    flag names (without the dashes) to values; a UserError names what is wrong with it."""
    if not os.path.isfile(path):
        raise UserError(f"--config {path}: no such file")
    with open(path) as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml  # optional: only a YAML config needs it
        except ImportError:
            raise UserError(f"--config {path}: reading YAML needs PyYAML (pip install pyyaml); or write the file as "
                            f"JSON") from None
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise UserError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    else:
        try:
            values = json.loads(text)
        except ValueError as e:
            raise UserError(f"--config {path}: not valid JSON ({e})") from None
    if not isinstance(values, dict):
        raise UserError(f"--config {path}: must hold a mapping of flag names to values, not {type(values).__name__}")
    return {str(k).lstrip("-").replace("-", "_"): v for k, v in values.items()}


def config_defaults(parser, values, path):
    """``values`` (``read_config``'s) checked against ``parser``'s flags, as its defaults: a flag the parser does not
    have, a value outside a flag's choices or one its type refuses is a UserError naming the flag; a string is
    converted by the flag's type as argparse would convert it. The command line still wins over them."""
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}
    out = {}
    for key, value in values.items():
        action = actions.get(key)
        if action is None or key == "config":
            raise UserError(f"--config {path}: {key} is not a flag of this command")
        try:
            if isinstance(value, str) and action.type is not None:
                value = action.type(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
            raise UserError(f"--config {path}: {key}: {e}") from None
        if action.choices is not None and value not in action.choices and not (
                isinstance(value, list) and all(v in action.choices for v in value)):
            raise UserError(f"--config {path}: {key} must be one of {', '.join(map(str, action.choices))}, not {value!r}")
        out[key] = value
    return out
