import pytest
import torch

from helper.errors import UserError
import helper.system
from helper.cli import get_args_parser
from helper.system import CompiledOrEager, amp_dtype, eval_batch_size, memory_format, select_device, use_compile


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


def test_compile_is_on_for_cuda_and_off_on_cpu_by_default():
    assert use_compile(torch.device("cuda")) is True
    assert use_compile(torch.device("cpu")) is False
    assert use_compile(torch.device("cpu"), "on") is True
    assert use_compile(torch.device("cuda"), "off") is False
    with pytest.raises(ValueError, match="auto, on or off"):
        use_compile(torch.device("cpu"), "yes")
    parse = get_args_parser().parse_args
    assert parse([]).compile == "auto"
    assert parse(["--compile"]).compile == "on"
    assert parse(["--compile", "off"]).compile == "off"


def test_a_failed_compile_warns_once_and_runs_uncompiled(monkeypatch, capsys):
    def broken_compile(fn):
        def compiled(*args, **kwargs):
            raise RuntimeError("Compiler: cc not found\nmore detail")
        return compiled
    monkeypatch.setattr(helper.system.torch, "compile", broken_compile)

    def double(x):
        return 2 * x

    f = CompiledOrEager(double)
    assert f(torch.tensor(3.0)).item() == 6.0
    assert f(torch.tensor(4.0)).item() == 8.0
    err = capsys.readouterr().err
    assert err.count("warning") == 1
    assert "torch.compile of double failed (RuntimeError: Compiler: cc not found); running it uncompiled" in err
