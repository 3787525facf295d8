"""Tensor-parallel runs equal the serial paper network, number by number.

tp=2 (2 processes) and dp=2 x tp=2 (4 processes) against tp=1 in this process, same seed, dropout
off, 3 SGD steps with momentum and weight decay: logits, losses, every gradient (gathered to the
serial layout) and every weight agree to 1e-5 relative, where "relative" is
max|parallel - serial| <= 1e-5 * max|serial| per tensor (float32; only the summation order of the
reductions differs). The collectives of one step are recorded and must be exactly the table's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from distalex.model import AlexNet, feature_map_sizes
from distalex.parallel.dims import init_parallel
from distalex.parallel.plan import full_grads, full_state_dict, parallelize
from distalex.parallel.trace import CollectiveSpy, recording_allreduce_hook
from tests.distributed import run_workers

SEED, STEPS, BATCH, CLASSES, SIZE, WIDTH = 0, 3, 8, 10, 64, 1 / 16
LR, MOMENTUM, WD = 0.05, 0.9, 5e-4
RTOL = 1e-5


def tiny_model(dropout: float = 0.0) -> AlexNet:
    torch.manual_seed(SEED)
    return AlexNet(num_classes=CLASSES, towers=2, width=WIDTH, image_size=SIZE, dropout=dropout)


def data(batch: int = BATCH):
    g = torch.Generator().manual_seed(123)
    x = torch.randn(batch, 3, SIZE, SIZE, generator=g)
    y = torch.randint(0, CLASSES, (batch,), generator=g)
    return x, y


def train(model, x, y, tp_group, record_step=0):
    """STEPS of SGD; returns logits and gradients of step ``record_step``, losses, final weights."""
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    losses, logits, grads = [], None, None
    for step in range(STEPS):
        out = model(x)
        loss = F.cross_entropy(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step == record_step:
            logits, grads = out.detach().clone(), full_grads(_module(model), tp_group)
        opt.step()
        losses.append(loss.item())
    return {"logits": logits, "losses": losses, "grads": grads, "weights": full_state_dict(_module(model), tp_group)}


def _module(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, what: str):
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= RTOL * scale, f"{what}: max abs diff {err:.3e} > {RTOL} * {scale:.3e}"


def assert_runs_equal(run, ref):
    assert_close_rel(run["logits"], ref["logits"], "logits")
    assert_close_rel(torch.tensor(run["losses"]), torch.tensor(ref["losses"]), "losses")
    assert run["grads"].keys() == ref["grads"].keys()
    for name in ref["grads"]:
        assert run["grads"][name].shape == ref["grads"][name].shape, name
        assert_close_rel(run["grads"][name], ref["grads"][name], f"grad {name}")
        assert_close_rel(run["weights"][name], ref["weights"][name], f"weight {name}")


# ---------------------------------------------------------------------------- collectives


def expected_tp_calls(model: AlexNet, batch: int, tp_ranks: tuple) -> list:
    """The table: forward all-gather (conv3), all-reduce (fc6), all-reduce (fc8);
    backward all-reduce (fc7's input gradient), reduce-scatter (conv3's input gradient)."""
    side = feature_map_sizes(SIZE)["pool2"]  # conv3's input map
    c2_local = model.conv2.out_channels  # after parallelize: this rank's channels
    fc, classes = model.fc6.weight.shape[0], model.fc8.weight.shape[0]
    tp = len(tp_ranks)
    return [
        ("all_gather_into_tensor", tp_ranks, (c2_local * tp, batch, side, side)),
        ("all_reduce", tp_ranks, (batch, fc)),
        ("all_reduce", tp_ranks, (batch, classes)),
        ("all_reduce", tp_ranks, (batch, fc)),
        ("reduce_scatter_tensor", tp_ranks, (c2_local, batch, side, side)),
    ]


# ---------------------------------------------------------------------------- workers


def tp_worker(tp: int, dropout: float = 0.0):
    dims = init_parallel(tp=tp, towers=2, device="cpu")
    model = parallelize(tiny_model(dropout), dims.tp_group)
    x, y = data()
    if dims.dp_enabled:  # each dp rank takes its contiguous half of the global batch
        per = BATCH // dims.dp
        x, y = x[dims.dp_rank * per : (dims.dp_rank + 1) * per], y[dims.dp_rank * per : (dims.dp_rank + 1) * per]
        model = DistributedDataParallel(model, process_group=dims.dp_group)
    with CollectiveSpy() as spy:
        if dims.dp_enabled:  # DDP's own hook calls C++ directly; this one goes through the spy
            model.register_comm_hook(None, recording_allreduce_hook(dims.dp_group, spy))
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    result = train(model, x, y, dims.tp_group)
    # Logits and losses are per dp rank: gather the logits in dp order and average the losses
    # (equal halves) to compare with the serial batch.
    if dims.dp_enabled:
        losses = torch.tensor(result["losses"])
        dist.all_reduce(losses, group=dims.dp_group)
        result["losses"] = (losses / dims.dp).tolist()
        parts = [torch.empty_like(result["logits"]) for _ in range(dims.dp)]
        dist.all_gather(parts, result["logits"], group=dims.dp_group)
        result["logits"] = torch.cat(parts)
    tp_ranks = tuple(dist.get_process_group_ranks(dims.tp_group))
    dp_ranks = tuple(dist.get_process_group_ranks(dims.dp_group)) if dims.dp_enabled else ()
    result.update(
        # (kind, group, first tensor: the output of the flat gather and reduce-scatter)
        calls=[(c.kind, c.ranks, c.tensors[0][0]) for c in spy.calls],
        expected_tp=expected_tp_calls(_module(model), x.shape[0], tp_ranks),
        tp_ranks=tp_ranks,
        dp_ranks=dp_ranks,
        local_numel=sum(p.numel() for p in _module(model).parameters()),
    )
    return result


def dropout_worker():
    """With dropout on: masks agree across tp ranks where the activation is replicated."""
    dims = init_parallel(tp=2, towers=2, device="cpu")
    model = parallelize(tiny_model(dropout=0.5), dims.tp_group).train()
    model.reseed_dropout(42)
    fc = model.drop6.features
    ones = torch.ones(4, fc)
    mask6 = model.drop6(ones)  # replicated activation: the whole mask
    mask7 = model.drop7(ones[:, : fc // 2])  # sharded activation: this rank's slice
    masks6 = [torch.empty_like(mask6) for _ in range(2)]
    masks7 = [torch.empty_like(mask7) for _ in range(2)]
    dist.all_gather(masks6, mask6, group=dims.tp_group)
    dist.all_gather(masks7, mask7, group=dims.tp_group)
    return {"mask6": masks6, "mask7": masks7}


# ---------------------------------------------------------------------------- tests


def test_tp2_equals_serial():
    ref = train(tiny_model(), *data(), tp_group=None)
    runs = run_workers(tp_worker, 2, 2)
    for run in runs:
        assert_runs_equal(run, ref)
    assert ref["losses"][-1] != ref["losses"][0]  # the steps did something


def test_dp2_tp2_equals_serial_on_concatenated_batch():
    ref = train(tiny_model(), *data(), tp_group=None)
    runs = run_workers(tp_worker, 4, 2, timeout=240)
    for run in runs:
        assert_runs_equal(run, ref)


def test_tp_collectives_are_the_table():
    for run in run_workers(tp_worker, 2, 2):
        assert run["calls"] == run["expected_tp"]


def test_dp_group_carries_only_the_gradient_reduction():
    for run in run_workers(tp_worker, 4, 2, timeout=240):
        tp_calls = [c for c in run["calls"] if c[1] == run["tp_ranks"]]
        dp_calls = [c for c in run["calls"] if c[1] == run["dp_ranks"]]
        assert tp_calls == run["expected_tp"]
        assert len(tp_calls) + len(dp_calls) == len(run["calls"]), run["calls"]
        assert all(kind == "all_reduce" for kind, _, _ in dp_calls)
        # The buckets together hold every local parameter exactly once.
        assert sum(torch.Size(shape).numel() for _, _, shape in dp_calls) == run["local_numel"]
        # dp peers hold the same tower shards; tp peers hold different ones.
        assert run["dp_ranks"] != run["tp_ranks"] and set(run["dp_ranks"]) & set(run["tp_ranks"])


def test_dropout_masks_replicated_and_sharded():
    masks = run_workers(dropout_worker, 2)[0]
    m6a, m6b = masks["mask6"]
    assert torch.equal(m6a, m6b), "fc6's output is replicated: its mask must be the same on both tp ranks"
    assert 0 < (m6a == 0).float().mean() < 1
    # fc7's output is sharded: each rank's slice of one serial mask, so different masks.
    m7a, m7b = masks["mask7"]
    assert not torch.equal(m7a, m7b)
    serial = tiny_model(dropout=0.5).train()
    serial.reseed_dropout(42)
    fc = serial.drop6.features
    serial.drop6(torch.ones(4, fc))  # the generators advance as on the tp ranks
    assert torch.equal(serial.drop7(torch.ones(4, fc)), torch.cat([m7a, m7b], dim=1))


def test_dropout_on_loss_decreases():
    torch.manual_seed(0)
    model = tiny_model(dropout=0.5).train()
    x, y = data(8)
    opt = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9)
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < losses[0] - 0.3, losses
