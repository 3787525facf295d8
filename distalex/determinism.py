"""``train.deterministic``: the same numbers from the same inputs, on the CPU and on CUDA.

``torch.use_deterministic_algorithms(True)`` makes every op with a deterministic kernel use it and
every op without one raise (naming the op). On CUDA one more thing is needed, and it must come
first: cuBLAS reduces matrix products deterministically only with a fixed workspace, asked for by
``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (or ``:16:8``) in the environment when cuBLAS starts; without
it PyTorch raises at the first matrix product. So ``prepare`` runs before the first CUDA call
(``python -m distalex.train`` calls it before any process group exists) and sets the variable,
or refuses a value that would not be deterministic; ``enable`` (in ``distalex.train.setup``)
refuses CUDA when the variable was not set by then, with the reason, rather than fail at a step.
cuDNN's benchmark mode stays off: it could pick another (deterministic) convolution algorithm in
another run, with other rounding. Otherwise training turns it on (``choose_kernels``): cuDNN times
its algorithms for each convolution shape at its first call and keeps the fastest, which matters
most for the paper's 11x11 stride-4 conv1 and the grouped convolutions; each new shape (a short last
validation batch) costs one more timing.
"""

from __future__ import annotations

import os

import torch

from distalex.config import ConfigError

CUBLAS_WORKSPACE_CONFIG = "CUBLAS_WORKSPACE_CONFIG"
DETERMINISTIC_WORKSPACES = (":4096:8", ":16:8")  # the values cuBLAS documents as deterministic


def prepare(device: str, environ=None) -> None:
    """Before the first CUDA call of the process: what CUDA needs for ``train.deterministic``.

    ``device`` is ``parallel.device`` (auto, cpu, cuda). Where CUDA may be used, sets
    CUBLAS_WORKSPACE_CONFIG=:4096:8 unless it is set; a value that is set and not deterministic
    is a ConfigError that says so."""
    env = os.environ if environ is None else environ
    if device == "cpu":
        return
    value = env.get(CUBLAS_WORKSPACE_CONFIG)
    if value is None:
        env[CUBLAS_WORKSPACE_CONFIG] = DETERMINISTIC_WORKSPACES[0]
    elif value not in DETERMINISTIC_WORKSPACES:
        raise ConfigError(
            f"train.deterministic=true: {CUBLAS_WORKSPACE_CONFIG}={value} in the environment makes cuBLAS "
            f"non-deterministic; set it to {' or '.join(DETERMINISTIC_WORKSPACES)}, or unset it"
        )


def choose_kernels(deterministic: bool, device: torch.device) -> None:
    """The one place a training run picks its kernels: ``train.deterministic`` (``enable``), or else
    cuDNN's benchmark mode on (a plain global: it has no effect off CUDA)."""
    if deterministic:
        enable(device)
    else:
        torch.backends.cudnn.benchmark = True


def enable(device: torch.device, environ=None) -> None:
    """Deterministic algorithms from here on. On CUDA, refused (ConfigError) unless ``prepare`` (or the
    user) set CUBLAS_WORKSPACE_CONFIG before the first CUDA call."""
    env = os.environ if environ is None else environ
    if device.type == "cuda" and env.get(CUBLAS_WORKSPACE_CONFIG) not in DETERMINISTIC_WORKSPACES:
        raise ConfigError(
            f"train.deterministic=true on CUDA needs {CUBLAS_WORKSPACE_CONFIG}={DETERMINISTIC_WORKSPACES[0]} set before "
            f"the first CUDA call (found {env.get(CUBLAS_WORKSPACE_CONFIG)!r}): python -m distalex.train sets it; "
            "a program that calls distalex.train.train itself must export it first"
        )
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True)
