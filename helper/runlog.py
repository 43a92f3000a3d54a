"""The run folder: arguments, one JSON line per epoch, results. An existing run is never overwritten."""
import datetime
import json
import math
import os

from helper.errors import UserError


def make_run_dir(output_dir=None, root="runs", name="run"):
    """Create ``output_dir``, or ``root/<time>-<name>`` when none is given; refuse a folder that holds files."""
    if output_dir is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        output_dir = os.path.join(root, f"{stamp}-{name}")
        base, k = output_dir, 1
        while os.path.exists(output_dir):
            output_dir, k = f"{base}-{k}", k + 1
    elif os.path.isdir(output_dir) and os.listdir(output_dir):
        raise UserError(f"--output_dir {output_dir} already holds files; an existing run is never overwritten")
    elif os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UserError(f"--output_dir {output_dir} exists and is not a folder")
    os.makedirs(output_dir, exist_ok=True)
    return output_dir


def open_run(output_dir, name, record, out=print):
    """Make the run folder (``make_run_dir``), write ``args.json`` (``record``: the arguments and the run's
    environment) and print where it is. Returns the folder."""
    out_dir = make_run_dir(output_dir, name=name)
    write_json(os.path.join(out_dir, "args.json"), record)
    out(f"run folder: {out_dir}")
    return out_dir


def _clean(value):
    """JSON has no NaN or inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_clean(obj), f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    os.replace(tmp, path)


def append_jsonl(path, obj):
    with open(path, "a") as f:
        f.write(json.dumps(_clean(obj), sort_keys=True, default=str) + "\n")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
