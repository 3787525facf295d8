"""The parallel model a training job runs: built once from one seed on every rank, then cut to this
rank's towers (``parallel.plan``), placed, laid out and compiled. ``distalex.train`` and the tests
that must build it exactly as training does call ``build_parallel_model``.

Compiling and the gradient all-reduce (``compile_model``, the one place that decides): the model
is compiled in place, one graph (``fullgraph=True``), and the DDP engine then wraps it. The graph
is traced at the first training step, inside DDP's forward, and dynamo compiles any frame it
traces while a DDP forward is active with its DDP optimizer (``torch._dynamo.config.optimize_ddp``):
the one graph is split where DDP's gradient buckets end (``train.ddp_bucket_mb``), each piece
compiled on its own, so that each piece's backward ends with its bucket's gradients ready and DDP
starts that bucket's all-reduce while the next piece's backward runs. Compiling the DDP wrapper
instead cannot keep ``fullgraph``: dynamo breaks the graph in DDP's own forward (its logger).
"""

from __future__ import annotations

import torch
import torch._dynamo
from torch import nn

from distalex.config import Config
from distalex.model import build_model
from distalex.parallel.dims import ParallelDims
from distalex.parallel.plan import parallelize


def build_parallel_model(cfg: Config, dims: ParallelDims, compile_backend: str = "inductor"):
    """The full model from one seed on every rank, then this rank's towers (init independent of tp).
    ``compile_backend``: torch.compile's backend where ``train.compile`` is on (tests count graphs with
    a cheaper one)."""
    torch.manual_seed(cfg.train.seed)
    model = parallelize(build_model(cfg.model), dims.tp_group, cfg.parallel.layout)
    # Dropout masks: shared by the tp peers of a dp group, different across dp groups.
    model.reseed_dropout(cfg.train.seed + 7919 * dims.dp_rank)
    model = model.to(dims.device)
    if channels_last(cfg, dims.device):
        model = model.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        compile_model(model, compile_backend)
    return model


def compile_model(model: nn.Module, backend: str = "inductor", overlap: bool = True) -> None:
    """Compile ``model`` in place (its state-dict keys stay as they are): one graph or an error that
    says where not. ``overlap``: under DDP, split the graph at the gradient buckets so that their
    all-reduce runs while the backward goes on (the module docstring); False only to measure
    what the split gains (bench/step_check.py). The switch is dynamo's global, read when a graph
    is first traced."""
    torch._dynamo.config.optimize_ddp = "ddp_optimizer" if overlap else "no_optimization"
    model.compile(fullgraph=True, backend=backend)


def channels_last(cfg: Config, device: torch.device) -> bool:
    """``train.channels_last`` on ``device`` (auto: on CUDA only)."""
    return device.type == "cuda" if cfg.train.channels_last == "auto" else cfg.train.channels_last
