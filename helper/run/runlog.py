"""The run folder: arguments, one JSON line per epoch, results. An existing run is never overwritten.

Every file is written atomically (``atomic_write``: a temporary name in the same folder, then a rename), so a
kill at any moment leaves each file either whole or absent; a run writes ``results.json`` last.
"""
import datetime
import json
import math
import os

from helper.run.errors import UserError


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


def atomic_write(path, write):
    """``write(tmp)`` writes the file under a temporary name beside ``path``, which then replaces ``path`` in
    one rename; if ``write`` fails, ``path`` is untouched and the temporary file removed."""
    path = os.fspath(path)
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_torch_save(obj, path):
    """``torch.save`` through ``atomic_write``."""
    import torch
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def write_text(path, text):
    """Write ``text`` to ``path`` atomically, the file closed before it takes the name."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def write_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(_clean(obj), f, indent=2, sort_keys=True, default=str)
            f.write("\n")
    atomic_write(path, write)


def append_jsonl(path, obj):
    """Append one line and flush it to the file (the file is closed after every line)."""
    with open(path, "a") as f:
        f.write(json.dumps(_clean(obj), sort_keys=True, default=str) + "\n")


def write_jsonl(path, rows):
    """Rewrite a whole JSON-lines file atomically (``--resume`` keeps the lines of the completed epochs)."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.writelines(json.dumps(_clean(r), sort_keys=True, default=str) + "\n" for r in rows)
    atomic_write(path, write)


def read_jsonl(path, complete_only=False):
    """The rows of a JSON-lines file; ``complete_only`` drops a last line cut off by a kill."""
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    if complete_only and lines and not lines[-1].endswith("\n"):
        lines = lines[:-1]
    return [json.loads(line) for line in lines]
