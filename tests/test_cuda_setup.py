"""What a CUDA machine needs before training starts, checked on the CPU: the CUDA branches run with
torch.cuda's answers replaced (monkeypatch: there is no GPU here; a test says so where it does),
so what is checked is their decisions, environment and errors, not a GPU.

- More local ranks than GPUs: a clear error before any process group exists (not local_rank %
  device_count, which put two ranks on one GPU).
- ``train.deterministic`` on CUDA: CUBLAS_WORKSPACE_CONFIG set before the first CUDA call, or the
  run refused with the reason.
- cuDNN's benchmark mode: on after ``train.setup`` unless ``train.deterministic``.
"""

from __future__ import annotations

import signal

import pytest
import torch
import torch.distributed as dist

from distalex import determinism, train
from distalex.config import ConfigError
from distalex.parallel import dims as dims_module
from distalex.parallel.dims import ParallelConfigError, init_parallel, pick_device
from tests.distributed import free_port, run_workers
from tests.runs import DEMO_CONFIG, tiny_overrides, tiny_shards  # noqa: F401 - fixture


@pytest.fixture
def gpus(monkeypatch):
    """torch.cuda as on a node with ``n`` GPUs (set by calling the fixture's result); records set_device."""
    chosen = []

    def machine(n: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
        return chosen

    return machine


@pytest.fixture(autouse=True)
def keep_sigterm_handler():
    """train.main installs its SIGTERM handler (StopRequested) in this process: put pytest's back."""
    saved = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, saved)


def torchrun_env(monkeypatch, local_rank: int, world: int = 2) -> None:
    for k, v in dict(RANK=local_rank, WORLD_SIZE=world, LOCAL_RANK=local_rank, MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port()).items():
        monkeypatch.setenv(k, str(v))


def test_each_local_rank_takes_its_own_gpu(gpus):
    chosen = gpus(2)
    assert pick_device(1, "cuda") == torch.device("cuda", 1) and pick_device(0, "auto") == torch.device("cuda", 0)
    assert chosen == [1, 0]


@pytest.mark.parametrize("requested", ["cuda", "auto"])
def test_more_local_ranks_than_gpus_is_an_error_before_any_group(gpus, monkeypatch, requested):
    chosen = gpus(1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    torchrun_env(monkeypatch, local_rank=1)
    with pytest.raises(ParallelConfigError, match=r"LOCAL_RANK=1 but this node shows 1 GPU\(s\) \(CUDA_VISIBLE_DEVICES=3\): "
                                                  r"start at most 1 processes per node \(torchrun --nproc_per_node=1\)"):
        init_parallel(tp=2, towers=2, device=requested)
    assert not dist.is_initialized() and chosen == []


def test_train_main_exits_2_with_the_reason(gpus, monkeypatch, capsys):
    gpus(1)
    torchrun_env(monkeypatch, local_rank=1)
    with pytest.raises(SystemExit) as exit_:
        train.main(["--set", "parallel.device=cuda", "--set", "parallel.tp=2"])
    assert exit_.value.code == 2 and not dist.is_initialized()
    assert "error: LOCAL_RANK=1 but this node shows 1 GPU(s)" in capsys.readouterr().err


# ------------------------------------------------------------------ train.deterministic


@pytest.mark.parametrize("device", ["cuda", "auto"])
def test_prepare_sets_the_cublas_workspace_unless_set(device):
    env = {}
    determinism.prepare(device, env)
    assert env == {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    env = {"CUBLAS_WORKSPACE_CONFIG": ":16:8"}  # the other deterministic value is kept
    determinism.prepare(device, env)
    assert env == {"CUBLAS_WORKSPACE_CONFIG": ":16:8"}


def test_prepare_refuses_a_nondeterministic_workspace_and_ignores_the_cpu():
    with pytest.raises(ConfigError, match=r"CUBLAS_WORKSPACE_CONFIG=:0:0 in the environment makes cuBLAS non-deterministic; "
                                          r"set it to :4096:8 or :16:8, or unset it"):
        determinism.prepare("cuda", {"CUBLAS_WORKSPACE_CONFIG": ":0:0"})
    env = {"CUBLAS_WORKSPACE_CONFIG": ":0:0"}
    determinism.prepare("cpu", env)  # cuBLAS is never used there
    assert env == {"CUBLAS_WORKSPACE_CONFIG": ":0:0"}


@pytest.fixture
def restore_determinism():
    yield
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.benchmark = False


def test_enable_refuses_cuda_without_the_workspace(restore_determinism):
    with pytest.raises(ConfigError, match=r"train.deterministic=true on CUDA needs CUBLAS_WORKSPACE_CONFIG=:4096:8 set before the first "
                                          r"CUDA call \(found None\)"):
        determinism.enable(torch.device("cuda", 0), {})
    assert not torch.are_deterministic_algorithms_enabled()
    torch.backends.cudnn.benchmark = True
    determinism.enable(torch.device("cuda", 0), {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"})
    assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(False)
    determinism.enable(torch.device("cpu"), {})  # the CPU needs nothing first
    assert torch.are_deterministic_algorithms_enabled()


def test_train_main_sets_the_workspace_before_the_first_cuda_call(monkeypatch):
    """python -m distalex.train: CUBLAS_WORKSPACE_CONFIG is in the environment when the process
    group and device are set up (init_parallel: the first CUDA call), and a bad value stops the run
    there with exit status 2, before it."""
    seen = []

    def first_cuda_call(*args, **kwargs):
        seen.append(dims_module.os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
        raise ParallelConfigError("stop here")

    monkeypatch.setattr(train, "init_parallel", first_cuda_call)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")  # so that monkeypatch restores this process's value
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    with pytest.raises(SystemExit):
        train.main(["--set", "train.deterministic=true"])
    assert seen == [":4096:8"]
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    with pytest.raises(SystemExit) as exit_:
        train.main(["--set", "train.deterministic=true", "--set", "parallel.device=cuda"])
    assert exit_.value.code == 2 and seen == [":4096:8"]  # refused before init_parallel


def setup_kernels_worker(workdir: str, values: list[str]) -> dict:
    """cuDNN's benchmark flag and deterministic mode after ``train.setup``, with each flag first set
    the other way (a plain global: its value is what the run's convolutions will see)."""
    import os

    from distalex.config import load_config
    from distalex.stopping import StopRequested

    os.chdir(workdir)
    dims = init_parallel(tp=1, towers=2, device="cpu")
    out = {}
    for deterministic in (False, True):
        torch.backends.cudnn.benchmark = deterministic
        cfg = load_config(DEMO_CONFIG, [*values, f"train.deterministic={deterministic}", f"run_name=kernels-{deterministic}"])
        run = train.setup(cfg, dims, StopRequested())
        out[deterministic] = (torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled())
        run.tracker.close("FINISHED")
    return out


@pytest.mark.e2e
def test_setup_turns_cudnn_benchmark_on_unless_deterministic(tiny_shards, tmp_path):
    values = tiny_overrides(tiny_shards, **{"tracking.enabled": False})[1::2]  # the values of its --set pairs
    [result] = run_workers(setup_kernels_worker, 1, str(tmp_path), values, timeout=240)
    assert result == {False: (True, False), True: (False, True)}
