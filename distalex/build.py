"""The parallel model a training job runs: built once from one seed on every rank, then cut to this
rank's towers (``parallel.plan``), placed, laid out and compiled. ``distalex.train`` and the tests
that must build it exactly as training does call ``build_parallel_model``.
"""

from __future__ import annotations

import warnings

import torch

from distalex.config import Config
from distalex.model import build_model
from distalex.parallel.dims import ParallelDims
from distalex.parallel.plan import parallelize


def build_parallel_model(cfg: Config, dims: ParallelDims):
    """The full model from one seed on every rank, then this rank's towers (init independent of tp)."""
    torch.manual_seed(cfg.train.seed)
    model = parallelize(build_model(cfg.model), dims.tp_group, cfg.parallel.layout)
    # Dropout masks: shared by the tp peers of a dp group, different across dp groups.
    model.reseed_dropout(cfg.train.seed + 7919 * dims.dp_rank)
    model = model.to(dims.device)
    if channels_last(cfg, dims.device):
        model = model.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        model.compile(fullgraph=True, **compile_options(cfg, dims))  # one graph, or an error that says where not
    return model


def channels_last(cfg: Config, device: torch.device) -> bool:
    """``train.channels_last`` on ``device`` (auto: on CUDA only)."""
    return device.type == "cuda" if cfg.train.channels_last == "auto" else cfg.train.channels_last


def compile_options(cfg: Config, dims: ParallelDims) -> dict:
    """torch.compile's arguments for the model: CUDA graphs (reduce-overhead) where asked and possible."""
    if not cfg.train.cuda_graphs:
        return {}
    if dims.device.type != "cuda":
        if dims.is_main:
            warnings.warn(f"train.cuda_graphs=true: no CUDA device (running on {dims.device.type}); compiling without CUDA graphs",
                          stacklevel=2)
        return {}
    return {"mode": "reduce-overhead"}
