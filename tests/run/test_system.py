import pytest
import torch

import helper.run.system
from helper.defenses.options import get_args_parser
from helper.run.errors import UserError
from helper.run.system import (
    CompiledOrEager,
    amp_dtype,
    configure,
    eval_batch_size,
    memory_format,
    select_device,
    tf32_off,
    use_compile,
)


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
    monkeypatch.setattr(helper.run.system.torch, "compile", broken_compile)

    def double(x):
        return 2 * x

    f = CompiledOrEager(double)
    assert f(torch.tensor(3.0)).item() == 6.0
    assert f(torch.tensor(4.0)).item() == 8.0
    err = capsys.readouterr().err
    assert err.count("warning") == 1
    assert "torch.compile of double failed (RuntimeError: Compiler: cc not found); running it uncompiled" in err


def test_eval_every_auto_is_decided_by_the_runs_own_device():
    from helper.run.system import eval_every
    assert eval_every(torch.device("cuda"), "auto") == 1 and eval_every(torch.device("cuda:1"), "auto") == 1
    assert eval_every(torch.device("cpu"), "auto") == 5
    assert eval_every(torch.device("cpu"), 3) == 3 and eval_every(torch.device("cuda"), 7) == 7
    parse = get_args_parser().parse_args
    assert parse([]).eval_every == 1  # distri.py's own default is unchanged
    assert parse(["--eval_every", "auto"]).eval_every == "auto" and parse(["--eval_every", "4"]).eval_every == 4
    with pytest.raises(SystemExit):
        parse(["--eval_every", "often"])


def test_check_args_takes_eval_every_auto_and_refuses_zero():
    from helper.defenses.options import check_args
    parse = get_args_parser().parse_args
    assert check_args(parse(["--eval_every", "auto"])).eval_every == "auto"
    with pytest.raises(UserError, match="--eval_every must be at least 1, not 0"):
        check_args(parse(["--eval_every", "0"]))


@pytest.fixture
def restore_backends(monkeypatch):
    """configure sets process-wide flags: put them back after the test."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    cudnn = torch.backends.cudnn
    saved = (cudnn.benchmark, cudnn.deterministic, torch.backends.cuda.matmul.allow_tf32, cudnn.allow_tf32,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    yield
    cudnn.benchmark, cudnn.deterministic, torch.backends.cuda.matmul.allow_tf32, cudnn.allow_tf32 = saved[:4]
    torch.use_deterministic_algorithms(saved[4], warn_only=saved[5])


def test_configure_deterministic_sets_the_flags_and_a_later_run_gets_its_own(restore_backends):
    import os

    from helper.run.system import configure
    cuda = torch.device("cuda")  # only flags are set: no GPU needed
    configure(cuda, 0, deterministic=True)
    assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    configure(cuda, 0)  # the default: cuDNN's fastest kernels, no deterministic algorithms
    assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
    assert not torch.are_deterministic_algorithms_enabled()
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":16:8"  # one the user set is kept
    configure(torch.device("cpu"), 0, deterministic=True)
    assert torch.are_deterministic_algorithms_enabled() and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_deterministic_is_a_system_flag_of_every_entry_point():
    from helper.attacks.options import attack_parser
    assert get_args_parser().parse_args([]).deterministic is False
    assert get_args_parser().parse_args(["--deterministic"]).deterministic is True
    assert attack_parser([]).parse_args(["--deterministic"]).deterministic is True


def test_a_run_that_needs_fp32_turns_tf32_off_on_cuda_and_tf32_off_restores(restore_backends):
    """ASD's run: TF32 off for its whole length (ASL reads convolution outputs near 0); bench.py's ASD row: off inside
    the block only. Only the flags are tested: no GPU is needed to set them."""
    cuda = torch.device("cuda")
    configure(cuda, 0, tf32=False)
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    configure(cuda, 0)
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    with tf32_off(cuda):
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    with tf32_off(torch.device("cpu")):
        assert torch.backends.cudnn.allow_tf32  # nothing to do on the CPU
