import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


def read_json(path):
    """A JSON file's content, the file closed (a bare ``open`` leaves it to the collector: a ResourceWarning)."""
    with open(path) as f:
        return json.load(f)


def read_text(path):
    with open(path) as f:
        return f.read()


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def write_json_file(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)
