"""Local response normalisation: PyTorch's implementation against other formulations of the same function.

    python bench/lrn.py [--batch 128] [--threads 2] [--repeats 7] [--compile] [--channels-last] [--malloc system]

LRN as distalex uses it (``distalex.model.TowerLRN``): size 5, alpha 1e-4 (divided by size),
beta 0.75, k 2, across the channels of one tower, on the ReLU outputs of conv1 and conv2. At the
paper's 224 input and ``--batch B`` images the tower view is (2B, 48, 55, 55) after conv1 and
(2B, 128, 27, 27) after conv2.

``F.local_response_norm`` squares, pads the channels into a 5-D copy, runs ``avg_pool3d`` with a
(5, 1, 1) window and lets autograd differentiate all of it. The variants compute the same
b = a / (k + alpha/n * sum_window a^2)^beta:

  torch       F.local_response_norm (the reference; what distalex.model calls today)
  avgpool2d   avg_pool2d with a (5, 1) window and padding on a (N, 1, C, H*W) view: no pad copy
  conv2d      the window sum as a conv2d with a ones (5, 1) kernel on the same view
  cumsum      cumulative sum over channels, window = difference of two slices
  shift       zero-pad the channels once, add the 5 shifted slices; autograd for the backward
  distalex    distalex.lrn.local_response_norm, what the model uses: an autograd Function with the
              analytic backward dx = g * d^-beta - (2 alpha beta / n) * x * window_sum(g * x * d^(-beta-1)),
              on the CPU in float32 one numba-compiled loop per sample in each direction
  pool3d      avg_pool3d as PyTorch does, but with the padding inside the pool (no padded copy)
  pool3d_fn   pool3d's forward in a custom autograd Function with distalex's analytic backward

With ``--channels-last`` the maps (and gradients) are laid out channels last, as
``train.channels_last`` gives them to the LRN: distalex's loops then run over rows of 48 or 128
channels; the other variants get the same tensors.

``--malloc`` as in bench/bench.py: by default freed memory stays in the process
(``distalex.allocator``, as ``distalex.train`` runs on the CPU), so that a variant's time is not
that of the page faults of its fresh output tensors; ``--malloc system`` keeps glibc's defaults.

Each variant is checked against the reference (output and input gradient) before it is timed:
max |variant - torch| <= 1e-6 * max |torch| per tensor. Times are the median of ``--repeats`` runs
after warm-up, forward alone and forward + backward, the variants run round-robin so that load
from other processes hits all alike; both wall time and this process's CPU time are reported (with
one thread, CPU time barely moves when other jobs share the cores).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distalex.allocator import keep_freed_memory  # noqa: E402
from distalex.lrn import local_response_norm  # noqa: E402
from distalex.model import LRN_ALPHA, LRN_BETA, LRN_K, LRN_SIZE  # noqa: E402

SIZE, ALPHA, BETA, K = LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K


def lrn_torch(x: torch.Tensor) -> torch.Tensor:
    return F.local_response_norm(x, SIZE, ALPHA, BETA, K)


def lrn_avgpool2d(x: torch.Tensor) -> torch.Tensor:
    n, c = x.shape[:2]
    sq = (x * x).reshape(n, 1, c, -1)
    avg = F.avg_pool2d(sq, (SIZE, 1), stride=1, padding=(SIZE // 2, 0))  # count_include_pad: / SIZE
    return x / avg.view(x.shape).mul(ALPHA).add(K).pow(BETA)


_ONES: dict[tuple, torch.Tensor] = {}


def lrn_conv2d(x: torch.Tensor) -> torch.Tensor:
    n, c = x.shape[:2]
    key = (x.dtype, x.device)
    if key not in _ONES:
        _ONES[key] = torch.ones(1, 1, SIZE, 1, dtype=x.dtype, device=x.device)
    sq = (x * x).reshape(n, 1, c, -1)
    s = F.conv2d(sq, _ONES[key], padding=(SIZE // 2, 0))
    return x / s.view(x.shape).mul(ALPHA / SIZE).add(K).pow(BETA)


def _window_sum_cumsum(sq: torch.Tensor) -> torch.Tensor:
    c = sq.shape[1]
    pad = [0, 0] * (sq.dim() - 2) + [SIZE // 2 + 1, (SIZE - 1) // 2]  # one extra leading zero
    cs = F.pad(sq, pad).cumsum(1)
    return cs.narrow(1, SIZE, c) - cs.narrow(1, 0, c)


def lrn_cumsum(x: torch.Tensor) -> torch.Tensor:
    s = _window_sum_cumsum(x * x)
    return x / s.mul(ALPHA / SIZE).add(K).pow(BETA)


def window_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the SIZE channels centred on each channel (zeros outside), as 1 pad + SIZE-1 adds."""
    c = t.shape[1]
    pad = [0, 0] * (t.dim() - 2) + [SIZE // 2, (SIZE - 1) // 2]
    p = F.pad(t, pad)
    s = p.narrow(1, 0, c) + p.narrow(1, 1, c)
    for i in range(2, SIZE):
        s.add_(p.narrow(1, i, c))  # in place: add's backward needs neither input
    return s


def lrn_shift(x: torch.Tensor) -> torch.Tensor:
    return x / window_sum(x * x).mul(ALPHA / SIZE).add(K).pow(BETA)


def lrn_distalex(x: torch.Tensor) -> torch.Tensor:
    return local_response_norm(x, SIZE, ALPHA, BETA, K)


def window_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over the SIZE channels centred on each channel, zeros outside (always / SIZE), in one
    avg_pool3d pass on a (N, 1, C, H, W*...) view with the padding inside the kernel (no padded copy)."""
    n, c = t.shape[:2]
    v = t.reshape(n, 1, c, t.shape[2] if t.dim() > 2 else 1, -1)
    return F.avg_pool3d(v, (SIZE, 1, 1), stride=1, padding=(SIZE // 2, 0, 0)).view(t.shape)


def lrn_pool3d(x: torch.Tensor) -> torch.Tensor:
    return x / window_mean(x * x).mul(ALPHA).add(K).pow(BETA)


class _LRNPoolFunction(torch.autograd.Function):
    """Forward as F.local_response_norm without the padded copy; backward in closed form:

    dx = g d^-beta - 2 alpha beta x window_mean(g x d^(-beta-1)),  d = k + alpha window_mean(x^2)
    (alpha here is the per-size alpha times size, as in F.local_response_norm)."""

    @staticmethod
    def forward(ctx, x):
        d = window_mean(x * x).mul_(ALPHA).add_(K)
        scale = d.pow(-BETA)
        ctx.save_for_backward(x, d, scale)
        return x * scale

    @staticmethod
    def backward(ctx, g):
        x, d, scale = ctx.saved_tensors
        gs = g * scale
        inner = (gs * x).div_(d)
        return torch.addcmul(gs, window_mean(inner), x, value=-2 * ALPHA * BETA)


def lrn_pool3d_fn(x: torch.Tensor) -> torch.Tensor:
    return _LRNPoolFunction.apply(x)


VARIANTS = {
    "torch": lrn_torch,
    "avgpool2d": lrn_avgpool2d,
    "conv2d": lrn_conv2d,
    "cumsum": lrn_cumsum,
    "shift": lrn_shift,
    "distalex": lrn_distalex,
    "pool3d": lrn_pool3d,
    "pool3d_fn": lrn_pool3d_fn,
}


def paper_shapes(batch: int, towers: int = 2) -> dict[str, tuple[int, ...]]:
    """The tower views TowerLRN normalises at 224 input (distalex.model.feature_map_sizes)."""
    return {"lrn1": (batch * towers, 96 // towers, 55, 55), "lrn2": (batch * towers, 256 // towers, 27, 27)}


def relu_like(shape, scale: float, seed: int = 0) -> torch.Tensor:
    """Non-negative with zeros, as after ReLU; ``scale`` sets how much the alpha term matters."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).clamp_(min=0).mul_(scale)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def check(fn, shape, device: torch.device, scales=(1.0, 30.0, 300.0), layout=torch.contiguous_format) -> dict[str, float]:
    """Worst output and input-gradient error against F.local_response_norm, over input scales."""
    worst_y = worst_g = 0.0
    small = (min(shape[0], 4), *shape[1:])
    for scale in scales:
        x = relu_like(small, scale, seed=1).to(device).contiguous(memory_format=layout).requires_grad_()
        g = torch.randn(small, generator=torch.Generator().manual_seed(2)).to(device).contiguous(memory_format=layout)
        y_ref = lrn_torch(x)
        (gx_ref,) = torch.autograd.grad(y_ref, x, g)
        y = fn(x)
        (gx,) = torch.autograd.grad(y, x, g)
        worst_y, worst_g = max(worst_y, rel_err(y, y_ref)), max(worst_g, rel_err(gx, gx_ref))
    return {"out_rel_err": worst_y, "grad_rel_err": worst_g}


def _timed(step, device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call; on CUDA both are wall, synchronised."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0, c0 = time.perf_counter(), time.process_time()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return (time.perf_counter() - t0,) * 2
    return time.perf_counter() - t0, time.process_time() - c0


def time_variants(fns: dict, shape, repeats: int, device: torch.device, warmup: int = 2,
                  layout=torch.contiguous_format) -> dict[str, dict[str, float]]:
    """Forward and forward+backward of every variant, round-robin (so load from other processes
    hits every variant alike); medians of wall and of CPU time, in ms."""
    x = relu_like(shape, 30.0).to(device).contiguous(memory_format=layout)
    xg = x.clone().requires_grad_()
    g = torch.randn(shape).to(device).contiguous(memory_format=layout)
    steps = {}
    for name, fn in fns.items():
        def fwd(fn=fn):
            with torch.no_grad():
                fn(x)

        def fwd_bwd(fn=fn):
            torch.autograd.grad(fn(xg), xg, g)

        steps[name] = {"fwd": fwd, "fwd_bwd": fwd_bwd}
    samples = {name: {k: ([], []) for k in ("fwd", "fwd_bwd")} for name in fns}
    for i in range(warmup + repeats):
        for name in fns:
            for kind, step in steps[name].items():
                wall, cpu = _timed(step, device)
                if i >= warmup:
                    samples[name][kind][0].append(wall)
                    samples[name][kind][1].append(cpu)
    return {
        name: {f"{kind}_{what}_ms": 1e3 * statistics.median(s[kind][j]) for kind in s for j, what in enumerate(("wall", "cpu"))}
        for name, s in samples.items()
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=128, help="images (the tower view has 2x this many rows)")
    p.add_argument("--threads", type=int, default=1, help="1: CPU time is then robust to other jobs")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd torch and distalex (inductor)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (on CUDA the 'CPU' columns are synchronised wall time)")
    p.add_argument("--channels-last", action="store_true", help="the maps and gradients channels last (train.channels_last)")
    p.add_argument("--malloc", choices=("keep", "system"), default="keep",
                   help="keep: freed host memory stays in the process (distalex.allocator); system: glibc's defaults")
    p.add_argument("--json", default=None, help="write the rows here too")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    malloc_kept = a.malloc == "keep" and keep_freed_memory()
    torch.set_num_threads(a.threads)
    names = [n for n in a.variants.split(",") if n]
    fns = {n: VARIANTS[n] for n in names}
    if a.compile:
        fns.update({f"{n}+compile": torch.compile(VARIANTS[n], dynamic=False) for n in ("torch", "distalex") if n in names})
    layout = torch.channels_last if a.channels_last else torch.contiguous_format
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} thread(s), float32, batch {a.batch}, "
          f"{'channels-last' if a.channels_last else 'NCHW'}, freed memory {'kept' if malloc_kept else 'returned (glibc)'}; median of {a.repeats} "
          f"round-robin runs; speed-up = {names[0]} CPU time / variant CPU time")
    rows = []
    for layer, shape in paper_shapes(a.batch).items():
        print(f"\n{layer} {tuple(shape)}  ({torch.Size(shape).numel() * 4 / 2**20:.0f} MiB float32)")
        print(f"  {'variant':16s} {'fwd ms':>15s} {'fwd+bwd ms':>15s} {'speed-up (CPU)':>15s} {'out err':>9s} {'grad err':>9s}")
        print(f"  {'':16s} {'wall':>7s} {'CPU':>7s} {'wall':>7s} {'CPU':>7s} {'fwd':>7s} {'f+b':>7s}")
        errs = {name: check(fn, shape, device, layout=layout) for name, fn in fns.items()}
        times = time_variants(fns, shape, a.repeats, device, layout=layout)
        base = times[names[0]]
        for name in fns:
            t, err = times[name], errs[name]
            ok = err["out_rel_err"] <= 1e-6 and err["grad_rel_err"] <= 1e-6
            row = {"layer": layer, "shape": list(shape), "channels_last": a.channels_last, "variant": name, **t, **err, "equal_1e-6": ok,
                   "speedup_fwd_cpu": base["fwd_cpu_ms"] / t["fwd_cpu_ms"],
                   "speedup_fwd_bwd_cpu": base["fwd_bwd_cpu_ms"] / t["fwd_bwd_cpu_ms"]}
            rows.append(row)
            print(f"  {name:16s} {t['fwd_wall_ms']:7.1f} {t['fwd_cpu_ms']:7.1f} {t['fwd_bwd_wall_ms']:7.1f} {t['fwd_bwd_cpu_ms']:7.1f} "
                  f"{row['speedup_fwd_cpu']:6.2f}x {row['speedup_fwd_bwd_cpu']:6.2f}x "
                  f"{err['out_rel_err']:9.1e} {err['grad_rel_err']:9.1e}{'' if ok else '  NOT EQUAL (> 1e-6)'}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
