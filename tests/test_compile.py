"""A training step compiles to one graph: forward, loss and backward, at tp=1 and tp=2 in both layouts.

``torch.compile(fullgraph=True)`` of ``F.cross_entropy(model(x), y)``, dropout on, 2 gloo processes
at tp=2: dynamo's own ``explain`` finds one graph and no graph break (the seeded dropout draw and
the collectives are inside it; the hybrid layout's sample split is an argument, not state), and
the backward is that graph's compiled backward alone (every node autograd walks from the loss is
it or a parameter's gradient accumulator). Compiled by inductor, two
steps equal the eager steps from the same weights and dropout streams: the same dropout draws
(their streams end in the same state), and logits, loss and every gradient within RTOL of each
tensor's largest element (measured: under 6e-7). The eager LRN runs its compiled CPU loop, the
compiled one inductor's code for the tensor-op form: they differ by float32 rounding (~3e-7),
which the layers after it carry. Kaiming init, so that the gradients carry signal (with N(0, 0.01)
conv1's are ~1e-9, and rounding alone moves them by percents).

At tp=1 both layouts are the same net (``parallelize`` changes nothing on one rank).
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

from distalex.model import AlexNet
from distalex.parallel.dims import init_parallel
from distalex.parallel.plan import full_grads, parallelize
from tests.distributed import run_workers

SIZE, WIDTH, CLASSES, BATCH, STEPS = 64, 1 / 16, 10, 8, 2
RTOL = 1e-5


def tiny_model() -> AlexNet:
    torch.manual_seed(0)
    model = AlexNet(num_classes=CLASSES, towers=2, width=WIDTH, image_size=SIZE, dropout=0.5, init="kaiming").train()
    model.reseed_dropout(42)
    return model


def data(step: int, device: str = "cpu"):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 3, SIZE, SIZE, generator=g).to(device), torch.randint(0, CLASSES, (BATCH,), generator=g).to(device)


def exact_float32(device: torch.device) -> None:
    """On CUDA: plain float32 convolutions and matrix products (no TF32), so that compiled and eager compare closely."""
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False


def backward_nodes(loss: torch.Tensor) -> set[str]:
    """The kinds of autograd node reachable from ``loss``."""
    seen, todo, kinds = set(), [loss.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        kinds.add(type(node).__name__)
        todo += [n for n, _ in node.next_functions]
    return kinds


def steps(model, loss_of, tp_group, device) -> dict:
    """STEPS forward/backward steps (no optimizer: each compares the same weights), and the dropout
    streams' state at the end."""
    out = {"losses": [], "logits": [], "grads": [], "nodes": set()}
    for step in range(STEPS):
        x, y = data(step, device)
        model.zero_grad(set_to_none=True)
        loss, logits = loss_of(x, y)
        loss.backward()
        out["nodes"] |= backward_nodes(loss)
        out["losses"].append(loss.detach().cpu())
        out["logits"].append(logits.detach().cpu())
        out["grads"].append(full_grads(model, tp_group))
    out["streams"] = [d.stream.get_state() for d in model.dropouts()]
    return out


def compile_worker(tp: int, layout: str, backend: str | None, device: str = "cpu") -> dict:
    """One graph or not (dynamo's explain), and, given a backend, compiled against eager steps.
    Also the GPU check's (tests/test_cuda.py), with device="cuda" (tp=2: one GPU per rank, NCCL)."""
    dims = init_parallel(tp=tp, towers=2, device=device, layout=layout)
    exact_float32(dims.device)
    model = parallelize(tiny_model(), dims.tp_group, layout).to(dims.device)

    def loss_and_logits(x, y):
        logits = model(x)
        return F.cross_entropy(logits, y), logits

    torch._dynamo.reset()
    explained = torch._dynamo.explain(loss_and_logits)(*data(0, dims.device))
    result = {"graphs": explained.graph_count, "breaks": explained.graph_break_count,
              "reasons": [str(b.reason) for b in explained.break_reasons]}
    if backend is None:
        return result
    model = parallelize(tiny_model(), dims.tp_group, layout).to(dims.device)  # explain ran the dropout streams on
    eager = steps(model, loss_and_logits, dims.tp_group, dims.device)
    model = parallelize(tiny_model(), dims.tp_group, layout).to(dims.device)
    torch._dynamo.reset()
    compiled = steps(model, torch.compile(loss_and_logits, fullgraph=True, backend=backend), dims.tp_group, dims.device)
    return {**result, "eager": eager, "compiled": compiled}


def assert_compiled_equals_eager(rank: dict) -> None:
    eager, compiled = rank["eager"], rank["compiled"]
    assert (rank["graphs"], rank["breaks"]) == (1, 0), rank["reasons"]
    # One compiled backward, nothing else: no eager op of the model outside the graph.
    assert compiled["nodes"] == {"CompiledFunctionBackward", "AccumulateGrad"}, compiled["nodes"]
    assert "CompiledFunctionBackward" not in eager["nodes"]
    # The dropout streams advanced alike: the compiled steps drew the eager steps' masks.
    assert all(torch.equal(a, b) for a, b in zip(compiled["streams"], eager["streams"]))
    for step in range(STEPS):
        assert rel(compiled["losses"][step], eager["losses"][step]) <= RTOL, step
        assert rel(compiled["logits"][step], eager["logits"][step]) <= RTOL, step
        for name, ref in eager["grads"][step].items():
            assert rel(compiled["grads"][step][name], ref) <= RTOL, (step, name, rel(compiled["grads"][step][name], ref))
    assert not torch.equal(eager["logits"][0], eager["logits"][1])  # two different steps


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def run(tp: int, layout: str, backend: str | None) -> list[dict]:
    if tp == 1:
        return [compile_worker(1, layout, backend)]
    return run_workers(compile_worker, tp, tp, layout, backend, timeout=600)


CASES = [(1, "towers"), (2, "towers"), (2, "hybrid")]
SPAWNED = pytest.mark.slow  # tp=2 compiles on two spawned ranks; tp=1 stays in the quick tier


@pytest.mark.parametrize(("tp", "layout"), [pytest.param(t, lay, marks=[SPAWNED] if t > 1 else []) for t, lay in CASES],
                         ids=[f"tp{t}-{lay}" for t, lay in CASES])
def test_step_is_one_graph_without_breaks(tp, layout):
    for rank in run(tp, layout, backend=None):
        assert (rank["graphs"], rank["breaks"]) == (1, 0), rank["reasons"]


@pytest.mark.slow
@pytest.mark.parametrize(("tp", "layout"), CASES, ids=[f"tp{t}-{lay}" for t, lay in CASES])
def test_inductor_step_equals_eager(tp, layout):
    """Inductor on the CPU (a cold compile takes a minute or two per process on a 2-core machine)."""
    for rank in run(tp, layout, backend="inductor"):
        assert_compiled_equals_eager(rank)
