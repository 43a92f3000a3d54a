import pytest
import torch

from helper.errors import UserError
from helper.system import amp_dtype, eval_batch_size, memory_format, select_device


def test_precision_is_bf16_on_cuda_and_fp32_on_cpu_by_default():
    assert amp_dtype(torch.device("cpu")) is None
    assert amp_dtype(torch.device("cuda")) is torch.bfloat16
    assert amp_dtype(torch.device("cuda"), "fp32") is None
    assert amp_dtype(torch.device("cpu"), "bf16") is torch.bfloat16


def test_eval_batch_size_defaults_per_device():
    assert eval_batch_size(torch.device("cpu")) == 256
    assert eval_batch_size(torch.device("cuda")) == 2000
    assert eval_batch_size(torch.device("cpu"), 64) == 64


def test_device_selection():
    assert select_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="unknown --device 'gpu0'"):
        select_device("gpu0")
    if not torch.cuda.is_available():
        assert select_device("auto") == torch.device("cpu")
        with pytest.raises(UserError, match="sees no CUDA GPU"):
            select_device("cuda")
    assert memory_format(torch.device("cpu")) is torch.channels_last
