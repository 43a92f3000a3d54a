"""Shared fixtures: a tiny ADBA-format teacher folder, and the flags of a fast synthetic run."""
import os

import pytest
import torch

from helper.data.teacher_dir import write_teacher
from models import resnet18

TEST_WIDTH = 4


def write_teacher_dir(path, width=TEST_WIDTH, seed=0, mask_value=0.3):
    """A folder as ADBA writes it: checkpoint.pkl (a list holding one state dict), pattern.pt, mask.pt."""
    os.makedirs(path, exist_ok=True)
    torch.manual_seed(seed)
    model = resnet18(num_classes=10, width=width)
    mask = torch.zeros(1, 32, 32)
    mask[:, -6:, -6:] = mask_value
    write_teacher(path, model, torch.rand(3, 32, 32), mask)
    return str(path)


@pytest.fixture
def teacher_dir(tmp_path):
    return write_teacher_dir(tmp_path / "teacher")


def fast_flags(read_dir, output_dir, epochs=2):
    """distri.py flags for a run of a few seconds on the CPU: synthetic data, tiny sizes."""
    return ["--read_dir", str(read_dir), "--output_dir", str(output_dir), "--dataset", "synthetic",
            "--finetunedata", "synthetic", "--synthetic_train", "256", "--synthetic_test", "128",
            "--subset_rate", "0.5", "--batch_size", "64", "--epoch", str(epochs), "--device", "cpu"]
