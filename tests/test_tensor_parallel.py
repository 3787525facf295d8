"""Tensor-parallel runs equal the serial paper network, number by number, in both layouts.

Each layout (``towers``, ``hybrid``) at tp=2 (2 processes) and dp=2 x tp=2 (4 processes) against
tp=1 in this process, same seed, dropout on, 3 SGD steps with momentum and weight decay: logits,
losses, every gradient (gathered to the serial layout) and every weight agree to 1e-5 relative,
where "relative" is max|parallel - serial| <= 1e-5 * max|serial| per tensor (float32; only the
summation order of the reductions differs). Each dp group draws its own dropout masks (tp peers
share theirs); the serial reference draws the same ones (``serial_model``). At tp=2 the trained
model also evaluates ragged batches (3 and 1 images) as the serial one does.

The collectives of one step are recorded and must be exactly the table's, and their kinds per
layer those of docs/parallelism.md's tables (from which docs/layouts.png is drawn). A hybrid rank's input rows other than its own samples are NaN
in training: its model must never read them.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from distalex.model import AlexNet, SharedDropout, feature_map_sizes
from distalex.parallel.dims import init_parallel
from distalex.parallel.layers import sample_counts
from distalex.parallel.plan import CONVS, full_grads, full_state_dict, parallelize
from distalex.parallel.trace import CollectiveSpy, label_layers, recording_allreduce_hook
from tests.distributed import run_workers
from tests.docs_commands import layer_table

SEED, STEPS, BATCH, CLASSES, SIZE, WIDTH = 0, 3, 8, 10, 64, 1 / 16
LR, MOMENTUM, WD = 0.05, 0.9, 5e-4
DROPOUT, EVAL_BATCHES = 0.5, (3, 1)
RTOL = 1e-5


def tiny_model(dropout: float = 0.0) -> AlexNet:
    torch.manual_seed(SEED)
    return AlexNet(num_classes=CLASSES, towers=2, width=WIDTH, image_size=SIZE, dropout=dropout)


def data(batch: int = BATCH):
    g = torch.Generator().manual_seed(123)
    x = torch.randn(batch, 3, SIZE, SIZE, generator=g)
    y = torch.randint(0, CLASSES, (batch,), generator=g)
    return x, y


def dropout_seed(dp_rank: int) -> int:
    """Each dp group's dropout stream (as distalex.train seeds them: shared by tp peers)."""
    return 42 + 7919 * dp_rank


class DPGroupDropout(SharedDropout):
    """The serial net's dropout drawing the masks the dp groups draw: the batch's d-th contiguous
    part (as ``ParallelDims.dp_batches`` splits it) from dp group d's stream. With one group it is
    that group's ``SharedDropout``."""

    def __init__(self, per_group: list[SharedDropout]):
        super().__init__(per_group[0].p, per_group[0].features)
        self.per_group = per_group

    def noise(self, x: torch.Tensor) -> torch.Tensor:
        parts = x.split(sample_counts(x.shape[0], len(self.per_group)))
        return torch.cat([d.noise(part) for d, part in zip(self.per_group, parts)])


def serial_model(dp: int) -> AlexNet:
    """The serial reference for a dp x tp run: the same net, with the dp groups' dropout masks."""
    model = tiny_model(DROPOUT)
    groups = []
    for d in range(dp):
        other = tiny_model(DROPOUT)
        other.reseed_dropout(dropout_seed(d))
        groups.append(other.dropouts())
    model.drop6, model.drop7 = (DPGroupDropout([g[i] for g in groups]) for i in range(2))
    return model


def train(model, x, y, tp_group, record_step=0, x_eval=None):
    """STEPS of SGD; returns logits and gradients of step ``record_step``, losses, final weights, and
    the trained model's eval logits on the first EVAL_BATCHES images of ``x_eval`` if given."""
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
    result = {"logits": logits, "losses": losses, "grads": grads, "weights": full_state_dict(_module(model), tp_group)}
    if x_eval is not None:
        model.eval()
        with torch.no_grad():
            result["eval_logits"] = [model(x_eval[:k]) for k in EVAL_BATCHES]
        model.train()
    return result


def _module(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, what: str):
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= RTOL * scale, f"{what}: max abs diff {err:.3e} > {RTOL} * {scale:.3e}"


def assert_runs_equal(run, ref):
    assert_close_rel(run["logits"], ref["logits"], "logits")
    for k, got, want in zip(EVAL_BATCHES, run.get("eval_logits", []), ref["eval_logits"]):
        assert_close_rel(got, want, f"eval logits of {k} images")
    assert_close_rel(torch.tensor(run["losses"]), torch.tensor(ref["losses"]), "losses")
    assert run["grads"].keys() == ref["grads"].keys()
    for name in ref["grads"]:
        assert run["grads"][name].shape == ref["grads"][name].shape, name
        assert_close_rel(run["grads"][name], ref["grads"][name], f"grad {name}")
        assert_close_rel(run["weights"][name], ref["weights"][name], f"weight {name}")


# ---------------------------------------------------------------------------- collectives


def expected_tp_calls(layout: str, model: AlexNet, batch: int, tp_ranks: tuple) -> list:
    """The tables, one step: (kind, group, first tensor's shape: the output of a flat gather,
    reduce-scatter or all-to-all), in call order.

    towers: forward all-gather (conv3), all-reduce (fc6), all-reduce (fc8); backward all-reduce
    (fc7's input gradient), reduce-scatter (conv3's input gradient).
    hybrid: forward all-to-all and all-reduce (fc6), all-reduce (fc8); backward all-reduce (fc7),
    all-to-all (fc6), then each conv's weight and bias gradient all-reduced, conv5 down to conv1.
    """
    fc, classes, tp = model.fc6.weight.shape[0], model.fc8.weight.shape[0], len(tp_ranks)
    if layout == "towers":
        side = feature_map_sizes(SIZE)["pool2"]  # conv3's input map
        c2_local = model.conv2.out_channels  # after parallelize: this rank's channels
        return [
            ("all_gather_into_tensor", tp_ranks, (c2_local * tp, batch, side, side)),
            ("all_reduce", tp_ranks, (batch, fc)),
            ("all_reduce", tp_ranks, (batch, classes)),
            ("all_reduce", tp_ranks, (batch, fc)),
            ("reduce_scatter_tensor", tp_ranks, (c2_local, batch, side, side)),
        ]
    block = model.fc6.in_features // tp
    mine = sample_counts(batch, tp)[0]  # the same on every rank: tp divides the batch here
    conv_grads = [("all_reduce", tp_ranks, tuple(p.shape)) for name in reversed(CONVS)
                  for p in (getattr(model, name).weight, getattr(model, name).bias)]
    return [
        ("all_to_all_single", tp_ranks, (batch, block)),
        ("all_reduce", tp_ranks, (batch, fc)),
        ("all_reduce", tp_ranks, (batch, classes)),
        ("all_reduce", tp_ranks, (batch, fc)),
        ("all_to_all_single", tp_ranks, (tp * mine, block)),
        *conv_grads,
    ]


WORDS = {"all_gather_into_tensor": "all-gather", "reduce_scatter_tensor": "reduce-scatter",
         "all_reduce": "all-reduce", "all_to_all_single": "all-to-all"}


# ---------------------------------------------------------------------------- workers


def tp_worker(tp: int, layout: str):
    dims = init_parallel(tp=tp, towers=2, device="cpu", layout=layout)
    model = parallelize(tiny_model(DROPOUT), dims.tp_group, layout)
    x, y = data()
    if dims.dp_enabled:  # each dp rank takes its contiguous half of the global batch
        per = BATCH // dims.dp
        x, y = x[dims.dp_rank * per : (dims.dp_rank + 1) * per], y[dims.dp_rank * per : (dims.dp_rank + 1) * per]
        model = DistributedDataParallel(model, process_group=dims.dp_group)
    x_eval = None if dims.dp_enabled else x
    if layout == "hybrid":  # a rank reads only its own samples: poison the others
        counts = sample_counts(x.shape[0], dims.tp)
        start = sum(counts[: dims.tp_rank])
        x = torch.full_like(x, float("nan")).index_copy(0, torch.arange(start, start + counts[dims.tp_rank]),
                                                        x[start : start + counts[dims.tp_rank]])
    with CollectiveSpy() as spy:
        labels = label_layers(_module(model), spy)
        if dims.dp_enabled:  # DDP's own hook calls C++ directly; this one goes through the spy
            model.register_comm_hook(None, recording_allreduce_hook(dims.dp_group, spy))
        F.cross_entropy(model(x), y).backward()
    for handle in labels:
        handle.remove()
    model.zero_grad(set_to_none=True)
    _module(model).reseed_dropout(dropout_seed(dims.dp_rank))  # after the recorded step, as from the start
    result = train(model, x, y, dims.tp_group, x_eval=x_eval)
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
        # (kind, group, first tensor: the output of the flat gather, reduce-scatter and all-to-all)
        calls=[(c.kind, c.ranks, c.tensors[0][0]) for c in spy.calls],
        phases=[(c.phase, c.layer) for c in spy.calls],
        expected_tp=expected_tp_calls(layout, _module(model), x.shape[0], tp_ranks),
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


LAYOUTS = ("towers", "hybrid")


@pytest.fixture(scope="module")
def runs():
    """One worker run per (layout, world size), shared by the tests below (spawning is the slow part)."""
    cache = {}

    def get(layout: str, world: int) -> list[dict]:
        if (layout, world) not in cache:
            cache[layout, world] = run_workers(tp_worker, world, 2, layout, timeout=240)
        return cache[layout, world]

    return get


@pytest.fixture(scope="module")
def serial():
    """The serial reference per dp degree (its dropout masks are the dp groups')."""
    x, y = data()
    return {dp: train(serial_model(dp), x, y, tp_group=None, x_eval=x) for dp in (1, 2)}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tp2_equals_serial(runs, serial, layout):
    for run in runs(layout, 2):
        assert_runs_equal(run, serial[1])
    assert serial[1]["losses"][-1] != serial[1]["losses"][0]  # the steps did something


@pytest.mark.parametrize("layout", LAYOUTS)
def test_dp2_tp2_equals_serial_on_concatenated_batch(runs, serial, layout):
    for run in runs(layout, 4):
        assert_runs_equal(run, serial[2])
    # the dp groups' masks differ, so the dp=2 reference is not the dp=1 one
    assert not torch.equal(serial[1]["logits"], serial[2]["logits"])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tp_collectives_are_the_table(runs, layout):
    for run in runs(layout, 2):
        assert run["calls"] == run["expected_tp"]


@pytest.mark.parametrize(("layout", "section"), [("towers", "Towers"), ("hybrid", "Hybrid")])
def test_docs_table_names_each_layers_collectives(runs, layout, section):
    """Per layer and direction, the kinds of collective the step made are docs/parallelism.md's table's."""
    run = runs(layout, 2)[0]
    seen: dict[tuple[str, str], set[str]] = {}
    for (kind, ranks, _), (phase, layer) in zip(run["calls"], run["phases"]):
        if ranks == run["tp_ranks"]:
            seen.setdefault((layer, phase), set()).add(WORDS[kind])
    table = [(layers, set(fwd), set(bwd)) for layers, fwd, bwd in layer_table(section)]
    covered = {layer for layers, _, _ in table for layer in layers}
    assert {layer for layer, _ in seen} <= covered, (seen, table)
    for layers, fwd, bwd in table:
        for layer in layers:
            assert seen.get((layer, "fwd"), set()) == fwd, (layer, "forward", seen)
            assert seen.get((layer, "bwd"), set()) == bwd, (layer, "backward", seen)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_dp_group_carries_only_the_gradient_reduction(runs, layout):
    for run in runs(layout, 4):
        tp_calls = [c for c in run["calls"] if c[1] == run["tp_ranks"]]
        dp_calls = [c for c in run["calls"] if c[1] == run["dp_ranks"]]
        assert tp_calls == run["expected_tp"]
        assert len(tp_calls) + len(dp_calls) == len(run["calls"]), run["calls"]
        assert all(kind == "all_reduce" for kind, _, _ in dp_calls)
        # The buckets together hold every local parameter exactly once.
        assert sum(torch.Size(shape).numel() for _, _, shape in dp_calls) == run["local_numel"]
        # dp peers hold the same shards; tp peers hold different ones.
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
