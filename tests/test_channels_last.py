"""train.channels_last: every conv-stack activation and its gradient stay channels-last, and the
step copies no activation into another layout but at the one place the design says (the flatten
before fc6, forward and backward). On the CPU, so with the LRN's compiled loops and the CPU pooling.

Copies are counted with torch.profiler: every ``aten::copy_`` of an activation-shaped tensor (4-d,
first dimension the batch; BATCH is no channel count of this net). Two other kinds of copy are
not layouts of the data and are left out by that rule: a convolution's weight gradient, which
oneDNN's backward writes through a buffer of its own (weight-shaped), and the dropout streams'
state and dtype casts (2-d or smaller).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from distalex.config import load_config
from distalex.memory_format import is_channels_last
from distalex.model import AlexNet
from distalex.parallel.dims import ParallelDims, init_parallel
from distalex.parallel.plan import full_grads, parallelize
from distalex.build import build_parallel_model
from tests.distributed import run_workers

BATCH, SIZE, WIDTH, CLASSES = 5, 127, 1 / 16, 10  # 127 px: pool5 is 3 x 3, so its flatten is a real layout change
CONV_STACK = ("conv1", "relu_lrn_pool1", "conv2", "relu_lrn_pool2", "conv3", "conv4", "conv5")


def tiny_model() -> AlexNet:
    torch.manual_seed(0)
    model = AlexNet(num_classes=CLASSES, towers=2, width=WIDTH, image_size=SIZE, dropout=0.5, init="kaiming").train()
    model.reseed_dropout(3)
    return model


def data(device):
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 3, SIZE, SIZE, generator=g).to(device), torch.randint(0, CLASSES, (BATCH,), generator=g).to(device)


def record_layouts(model) -> tuple[list, list]:
    """Hooks that note each conv-stack layer's output layout, and its gradient's, in call order
    (``pool`` once, after conv5: the other two are inside ``relu_lrn_pool1`` and ``relu_lrn_pool2``)."""
    forward, backward = [], []

    def hook(module, args, out, name):
        forward.append((name, is_channels_last(out)))
        out.register_hook(lambda g: backward.append((name, is_channels_last(g))))

    for name in (*CONV_STACK, "pool"):
        getattr(model, name).register_forward_hook(lambda m, a, o, name=name: hook(m, a, o, name))
    return forward, backward


def activation_copies(step) -> list[tuple[str, tuple]]:
    """(the op that made the copy, shape) of every activation-shaped aten::copy_ in ``step()``."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    copies = []
    for e in prof.events():
        shape = tuple(e.input_shapes[0]) if e.name == "aten::copy_" and e.input_shapes else ()
        if len(shape) == 4 and shape[0] == BATCH:
            parent = e.cpu_parent
            while parent is not None and parent.name.startswith("aten::"):
                parent = parent.cpu_parent
            copies.append((parent.name if parent is not None else "-", shape))
    return copies


def layout_worker(tp: int, layout: str, channels_last: bool, device: str = "cpu") -> dict:
    """Also the GPU check's (tests/test_cuda.py), with device="cuda" (tp=2: one GPU per rank, NCCL)."""
    dims = init_parallel(tp=tp, towers=2, device=device, layout=layout)
    if dims.device.type == "cuda":  # plain float32 (no TF32), so that layouts and tp degrees compare closely
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    model = parallelize(tiny_model(), dims.tp_group, layout).to(dims.device)
    x, y = data(dims.device)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    forward, backward = record_layouts(model)
    logits = model(x)
    F.cross_entropy(logits, y).backward()
    result = {"forward": list(forward), "backward": list(backward), "logits": logits.detach().cpu(), "grads": full_grads(model, dims.tp_group),
              "grad_layouts": {n: is_channels_last(p.grad) for n, p in model.named_parameters() if p.dim() == 4}}
    result["copies"] = activation_copies(lambda: F.cross_entropy(model(x), y).backward())
    return result


def rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def serial():
    return {cl: layout_worker(1, "towers", cl) for cl in (False, True)}


def test_every_layer_keeps_channels_last_forward_and_backward(serial):
    run = serial[True]
    names = [n for n, _ in run["forward"]]
    assert names == ["conv1", "relu_lrn_pool1", "conv2", "relu_lrn_pool2", "conv3", "conv4", "conv5", "pool"]
    assert all(cl for _, cl in run["forward"]), run["forward"]
    assert sorted(run["backward"]) == sorted(run["forward"]), run["backward"]  # every gradient channels-last too
    assert all(run["grad_layouts"].values()), run["grad_layouts"]  # and the conv weights' gradients
    assert not any(cl for _, cl in serial[False]["forward"])  # NCHW stays NCHW


def test_the_step_copies_no_activation_but_the_flatten(serial):
    side = 3  # pool5 at 127 px
    c5 = AlexNet(num_classes=CLASSES, towers=2, width=WIDTH, image_size=SIZE).conv5.out_channels
    assert serial[True]["copies"] == [("_FlattenChannelsLast", (BATCH, c5, side, side)),
                                      ("_FlattenChannelsLastBackward", (BATCH, c5, side, side))]
    # The count sees copies where there are some: NCHW pooling on the CPU goes through channels-last.
    assert any(op == "_ChannelsLastMaxPool" for op, _ in serial[False]["copies"]), serial[False]["copies"]


def test_channels_last_computes_the_nchw_step(serial):
    """Same net, other memory order: oneDNN picks other convolution kernels, so float32 rounding
    differs (measured ~1e-6); the LRN and pooling give the same numbers in both layouts."""
    nchw, cl = serial[False], serial[True]
    assert rel(cl["logits"], nchw["logits"]) < 1e-5
    for name, ref in nchw["grads"].items():
        assert rel(cl["grads"][name], ref) < 1e-4, name


@pytest.mark.slow  # two spawned ranks per layout; the serial checks above stay in the quick tier
@pytest.mark.parametrize("layout", ["towers", "hybrid"])
def test_tp2_keeps_channels_last(layout, serial):
    """At tp=2 too. Towers copy only inside conv3's exchange: a gathered map's channel blocks
    interleave in memory (one copy each way), and gloo copies each rank's block in and out of its
    buffers (no Python op above those: "-"). Hybrid convolves each rank's samples and copies none."""
    for rank in run_workers(layout_worker, 2, 2, layout, True, timeout=300):
        assert all(cl for _, cl in rank["forward"]) and sorted(rank["backward"]) == sorted(rank["forward"]), rank
        exchange = {op for op, _ in rank["copies"] if not op.startswith("_FlattenChannelsLast")}
        assert exchange <= ({"_GatherFromTP", "_GatherFromTPBackward", "-"} if layout == "towers" else set()), rank["copies"]
        assert rel(rank["logits"], serial[True]["logits"]) < 1e-5


def test_train_channels_last_setting():
    """auto: channels-last on CUDA only; true: on the CPU too (how the tests above run the net)."""
    dims = ParallelDims()
    for setting, expected in (("auto", False), ("true", True), ("false", False)):
        cfg = load_config(None, [f"train.channels_last={setting}", "model.width=0.0625", "model.image_size=64"])
        model = build_parallel_model(cfg, dims)
        assert is_channels_last(model.conv2.weight) == expected, setting
