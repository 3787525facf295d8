"""What only a CUDA GPU can check: bf16 against float32, compiled against eager (one graph per
step), channels-last against NCHW and kept through every layer, deterministic mode, the LRN on the
GPU, JPEG decoding on the GPU, tp=2 on NCCL (with two GPUs), and a short training run.

The one-graph, channels-last and tp=2 checks run the CPU tests' own workers (tests/test_compile.py,
tests/test_channels_last.py) with device="cuda", so that their logic is tested on the CPU too.

Marked ``cuda``; on a machine without CUDA every test skips and says why. ``bash bench/gpu_check.sh
OUT_DIR`` runs them (and the benchmark) on a GPU machine.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distalex.checkpoint import complete_checkpoints
from distalex.config import load_config
from distalex.engine import build_engine
from distalex.lrn import local_response_norm
from distalex.model import LRN_ALPHA, LRN_BETA, LRN_K, LRN_SIZE
from distalex.parallel.dims import ParallelDims
from distalex.build import build_parallel_model
from tests.distributed import run_workers
from tests.runs import REPO, launch, tiny_overrides, tiny_shards  # noqa: F401 - tiny_shards is a fixture
from tests.test_channels_last import layout_worker
from tests.test_compile import assert_compiled_equals_eager, compile_worker

two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2,
                              reason=f"tp=2 on NCCL needs 2 GPUs, this machine has {torch.cuda.device_count()}")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bash bench/gpu_check.sh OUT_DIR runs these on one)"),
]

PAPER_LRN = (LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K)


@pytest.fixture
def cuda_dims() -> ParallelDims:
    return ParallelDims(device=torch.device("cuda"))


@contextlib.contextmanager
def exact_float32():
    """Plain float32 convolutions and matmuls (no TF32), so that two layouts or two compilers of one
    net can be compared closely."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def paper_net_config(*overrides: str):
    """The paper's net (224 px, width 1) on one GPU; Kaiming init so that the logits carry signal."""
    return load_config(None, ["parallel.tp=1", "parallel.device=cuda", "model.init=kaiming", *overrides])


def batch(size: int = 32, classes: int = 1000, side: int = 224, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(size, 3, side, side, generator=g).cuda(), torch.randint(0, classes, (size,), generator=g).cuda()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def assert_same_gradients(got: dict, ref: dict) -> None:
    """Every parameter's gradient within 2% in norm and pointing the same way (cosine > 0.9995).

    Not elementwise: max pooling takes each window's first maximum, and two convolution algorithms
    (layouts, compilers) differ by ~1e-6, which flips the pick where two values of a window are
    that close and moves that position's gradient. On the CPU (same check, batch 32) that moved
    conv1's and conv2's weight gradients by up to 1% of their largest element, 0.5% in norm."""
    for name in ref:
        norm_err = ((got[name].double() - ref[name].double()).norm() / ref[name].double().norm()).item()
        assert norm_err < 0.02 and cosine(got[name], ref[name]) > 0.9995, (name, norm_err, cosine(got[name], ref[name]))


def forward_backward(model, x, y):
    """Logits and every parameter's gradient of one cross-entropy step (no optimizer)."""
    model.zero_grad(set_to_none=True)
    logits = model(x)
    F.cross_entropy(logits, y).backward()
    return logits.detach().float(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def test_bf16_step_is_within_tolerance_of_float32(cuda_dims):
    """One SGD step through the engine (``train.precision``): bf16 autocast against float32 from
    the same weights and batch. The loss agrees to 2%, every gradient points the same way."""
    x, y = batch()
    results = {}
    for precision in ("fp32", "bf16"):
        cfg = paper_net_config(f"train.precision={precision}", "model.dropout=0")
        engine = build_engine(build_parallel_model(cfg, cuda_dims), cfg, cuda_dims)
        assert engine.autocast_dtype == (torch.bfloat16 if precision == "bf16" else None)
        with exact_float32():
            loss = engine.train_step(x, y).item()
        results[precision] = loss, {n: p.grad.float() for n, p in engine.module.named_parameters()}
    (loss32, grads32), (loss16, grads16) = results["fp32"], results["bf16"]
    assert abs(loss16 - loss32) <= 0.02 * loss32, (loss16, loss32)
    worst = min((cosine(grads16[n], grads32[n]), n) for n in grads32)
    assert worst[0] > 0.98, worst


def test_compiled_equals_eager(cuda_dims):
    """``train.compile`` (inductor) computes the eager net: logits and gradients, dropout on (its
    masks come from the same generators), two steps so that a cached graph is checked too."""
    eager_cfg = paper_net_config()
    compiled_cfg = paper_net_config("train.compile=true")
    eager, compiled = build_parallel_model(eager_cfg, cuda_dims), build_parallel_model(compiled_cfg, cuda_dims)
    with exact_float32():
        for step in range(2):
            x, y = batch(seed=step)
            out_e, g_e = forward_backward(eager, x, y)
            out_c, g_c = forward_backward(compiled, x, y)
            assert rel(out_c, out_e) < 1e-4, step
            assert_same_gradients(g_c, g_e)


def test_channels_last_equals_nchw(cuda_dims):
    """``train.channels_last`` changes the memory layout, not the function (float32, no TF32)."""
    cfg = paper_net_config("model.dropout=0")
    nchw, cl = build_parallel_model(cfg, cuda_dims), build_parallel_model(cfg, cuda_dims)
    cl = cl.to(memory_format=torch.channels_last)
    x, y = batch()
    with exact_float32():
        out_n, g_n = forward_backward(nchw, x, y)
        out_c, g_c = forward_backward(cl, x.contiguous(memory_format=torch.channels_last), y)
    assert rel(out_c, out_n) < 1e-4
    assert_same_gradients(g_c, g_n)


def test_step_is_one_graph_and_equals_eager_on_cuda():
    """tests/test_compile.py on the GPU: forward, loss and backward one graph (no break, the
    dropout draw from its CUDA stream inside it), and inductor's (Triton) steps equal eager's."""
    assert_compiled_equals_eager(compile_worker(1, "towers", "inductor", "cuda"))


def test_channels_last_through_every_layer_on_cuda():
    """tests/test_channels_last.py on the GPU: every conv-stack output and gradient channels-last,
    no activation copied but at the flatten before fc6, and the NCHW step's numbers."""
    nchw, cl = layout_worker(1, "towers", False, "cuda"), layout_worker(1, "towers", True, "cuda")
    assert all(last for _, last in cl["forward"]) and sorted(cl["backward"]) == sorted(cl["forward"]), cl["forward"]
    assert [op for op, _ in cl["copies"]] == ["_FlattenChannelsLast", "_FlattenChannelsLastBackward"], cl["copies"]
    assert rel(cl["logits"], nchw["logits"]) < 1e-4
    assert_same_gradients(cl["grads"], nchw["grads"])


DETERMINISTIC_STEP = """
import os, torch, torch.nn.functional as F
from distalex import determinism
from distalex.model import AlexNet
determinism.prepare("cuda")  # as python -m distalex.train does, before the first CUDA call
assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
determinism.enable(torch.device("cuda", 0))
g = torch.Generator().manual_seed(0)
x, y = torch.randn(32, 3, 224, 224, generator=g).cuda(), torch.randint(0, 1000, (32,), generator=g).cuda()
runs = []
for _ in range(2):
    torch.manual_seed(0)
    model = AlexNet(init="kaiming").cuda().to(memory_format=torch.channels_last).train()
    model.reseed_dropout(1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), y)
    loss.backward()
    runs.append([loss.detach()] + [p.grad for p in model.parameters()])
same = [torch.equal(a, b) for a, b in zip(*runs)]
print("deterministic:", all(same), same.count(False), "of", len(same), "differ")
"""


def test_deterministic_mode_repeats_a_step_bit_for_bit():
    """train.deterministic on CUDA (the default bf16, channels-last step of the paper's net): the
    cuBLAS workspace is set before the first CUDA call and no op of the step refuses deterministic
    mode; the same step twice gives the same loss and gradients bit for bit. In a fresh process:
    cuBLAS reads the variable when it starts."""
    proc = subprocess.run([sys.executable, "-c", DETERMINISTIC_STEP], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "deterministic: True" in proc.stdout, proc.stdout


@two_gpus
@pytest.mark.parametrize("layout", ["towers", "hybrid"])
def test_tp2_on_nccl_equals_one_gpu(layout):
    """tp=2 over NCCL, one GPU per rank, against the same net on one GPU (dropout on, float32 without
    TF32): logits within 1e-4, every gradient the same in norm and direction; channels-last kept
    through every layer; and the compiled tp=2 step equals the eager one (one graph, collectives
    inside)."""
    serial = layout_worker(1, "towers", True, "cuda")
    for rank in run_workers(layout_worker, 2, 2, layout, True, "cuda", timeout=300):
        assert all(last for _, last in rank["forward"]), rank["forward"]
        assert rel(rank["logits"], serial["logits"]) < 1e-4
        assert_same_gradients(rank["grads"], serial["grads"])
    for rank in run_workers(compile_worker, 2, 2, layout, "inductor", "cuda", timeout=600):
        assert_compiled_equals_eager(rank)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "inductor"])
def test_fast_lrn_equals_torch_on_cuda(compiled):
    """distalex.lrn on the GPU, eager and compiled to Triton by inductor: F.local_response_norm's
    output and input gradient to 1e-6 in float32; in bf16, within a bf16 unit of the float32 LRN."""
    fn = lambda t: local_response_norm(t, *PAPER_LRN)  # noqa: E731
    if compiled:
        fn = torch.compile(fn, fullgraph=True)
    g = torch.Generator().manual_seed(0)
    for shape in ((256, 48, 55, 55), (256, 128, 27, 27)):  # the tower views at batch 128
        x = (torch.randn(shape, generator=g).clamp_(min=0) * 30).cuda()
        grad = torch.randn(shape, generator=g).cuda()
        for dtype in (torch.float32, torch.bfloat16):
            xd = x.to(dtype).requires_grad_()
            out = fn(xd)
            (dx,) = torch.autograd.grad(out, xd, grad.to(dtype))
            xr = xd.detach().float().requires_grad_()
            ref = F.local_response_norm(xr, *PAPER_LRN)
            (dref,) = torch.autograd.grad(ref, xr, grad.to(dtype).float())
            tol = 1e-6 if dtype == torch.float32 else 2.0**-8
            assert out.dtype == dtype and rel(out, ref) <= tol and rel(dx, dref) <= tol, (shape, dtype)


def jpeg_bytes(subsampling: int, seed: int) -> tuple[bytes, np.ndarray]:
    """A photo-like 256 x 320 image (smooth colour fields, edges, noise) encoded by PIL at quality 90."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:256, 0:320].astype(np.float32)
    img = np.stack([128 + 100 * np.sin(xx / 37 + c) * np.cos(yy / 23 - c) for c in range(3)], axis=-1)
    img[80:160, 100:220] = rng.integers(0, 256, 3)  # a flat patch with sharp edges
    img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90, subsampling=subsampling)
    return buf.getvalue(), img


@pytest.mark.parametrize("subsampling", [0, 2], ids=["4:4:4", "4:2:0"])
def test_gpu_jpeg_decode_equals_cpu_decode(subsampling):
    """nvJPEG (torchvision.io.decode_jpeg on 'cuda') against PIL's libjpeg on the same bytes. The
    IDCTs differ in rounding and, with 4:2:0, in chroma upsampling: equal to a level or two on
    average, never far apart."""
    from PIL import Image
    from torchvision.io import decode_jpeg

    for seed in range(4):
        data, _ = jpeg_bytes(subsampling, seed)
        cpu = torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)
        gpu = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), device="cuda").cpu()
        assert gpu.shape == cpu.shape and gpu.dtype == torch.uint8
        diff = (gpu.int() - cpu.int()).abs().float()
        limit_mean, limit_999 = (0.6, 4) if subsampling == 0 else (2.0, 32)
        assert diff.mean() <= limit_mean and diff.flatten().quantile(0.999) <= limit_999, (
            subsampling, seed, diff.mean().item(), diff.max().item())


@pytest.mark.parametrize("form", ["paper", "mixed"])
def test_batched_gpu_crops_equal_the_cpu_devices_without_a_sync(form):
    """data.decode=gpu's batch crops on the GPU: from nvJPEG's pixels, the same bytes as the same
    ops on the CPU device (tolerance 0), with no host sync (``set_sync_debug_mode("error")``) while
    the batch is cut, resampled and flipped."""
    from distalex.data.decode import crop_batch, decode_images
    from distalex.data.make_shards import paper_form
    from tests.test_data_decode import MIXED, photo_jpeg, random_crops

    jpegs = [photo_jpeg(w, h, i) for i, (w, h) in enumerate(MIXED * 2)]
    if form == "paper":
        jpegs = [paper_form(j, 256, 90)[0] for j in jpegs]
    crops = np.array(random_crops(len(jpegs), 7), dtype=np.float64)
    images = decode_images([torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs], torch.device("cuda"))
    assert all(img is not None and img.is_cuda for img in images)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gpu = crop_batch(images, crops, 256, 224)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu = crop_batch([img.cpu() for img in images], crops, 256, 224)
    assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu)


@pytest.mark.e2e
def test_short_training_run_on_cuda(tiny_shards, tmp_path):
    """The demo config on the GPU for a few steps, tp=1: one process per GPU (up to 2; with 2, dp=2
    over nccl; with 1, world size 1 needs no process group), with train.deterministic (the tests'
    default: python -m distalex.train sets the cuBLAS workspace itself). It ends cleanly with a
    finite loss and a checkpoint."""
    nproc = min(2, torch.cuda.device_count())
    overrides = tiny_overrides(tiny_shards, **{"parallel.tp": 1, "parallel.device": "cuda", "train.epochs": 1,
                                               "train.max_steps": 6, "tracking.enabled": "false"})
    proc = launch(tmp_path, overrides, nproc=nproc, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"(dp={nproc} x tp=1) backend=nccl" in proc.stdout
    last = complete_checkpoints(tmp_path / "runs" / "demo" / "checkpoints")[-1]
    assert int(last.name.split("-")[1]) == 6, last
