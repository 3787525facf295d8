"""The DeepSpeed engine (ZeRO-1 and ZeRO-2 over the dp group) equals the DDP engine and the serial net.

One worker run per layout (dp=2 on 2 processes; dp=2 x tp=2 on 4, towers and hybrid) does everything, because
DeepSpeed's start-up is the slow part: the ``ddp`` engine, then for each ZeRO stage a
``deepspeed`` engine that trains, takes its shard state (weights, momentum gathered over dp) half
way and trains on, and a freshly built one that loads that state and trains the second half. Same seed, dropout off, the paper's SGD (momentum,
weight decay) with an LR drop half way, set through ``engine.lr`` as the training loop does, and the
authors' bias conventions (biases at twice the LR, not decayed): two parameter groups, which ZeRO
flattens one by one.
At dp=2 a last engine runs the bf16 path CUDA takes (autocast inside DeepSpeed's forward, float32
gradient averaging) on the CPU.

Tolerances:
- ddp vs deepspeed, per rank: losses and gathered weights within ENGINE_RTOL = 1e-6 relative
  (max|a - b| <= 1e-6 * max|b|). Both average two gradients over dp and run torch's SGD on the
  same values; only ZeRO's flat buffers and its reduction order could differ (measured: bitwise equal,
  both stages, both layouts).
- vs the serial net (tp=1, one process, whole batch): RTOL = 1e-5 relative, as in
  test_tensor_parallel.py (the reductions' summation order differs).
- resume vs uninterrupted: exactly equal (same process layout, same operations).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from distalex.checkpoint import (
    CheckpointManager, RandomStreams, TrainState, join_shards, load_serial_state, partition_map, read_meta, shard_file,
)
from distalex.config import Config
from distalex.engine import DDPEngine
from distalex.parallel.dims import ParallelDims, init_parallel
from distalex.parallel.plan import full_state_dict, gather_full, parallelize
from distalex.parallel.trace import CollectiveSpy
from tests.distributed import run_workers
from tests.test_tensor_parallel import BATCH, LR, MOMENTUM, WD, assert_close_rel, data, tiny_model

pytestmark = pytest.mark.slow  # DeepSpeed start-up on 2-4 processes per layout: minutes for the module

STEPS, SAVE_AFTER = 4, 2  # checkpoint after step 2 of 4
LR_DROP = 0.1  # engine.lr = LR * LR_DROP from step SAVE_AFTER on
STAGES = (1, 2)
ENGINE_RTOL = 1e-6


def make_cfg(engine: str, tp: int, zero_stage: int = 1, layout: str = "towers") -> Config:
    return Config.model_validate(
        {
            "model": {"dropout": 0.0},
            "parallel": {"tp": tp, "device": "cpu", "layout": layout},
            "optim": {"lr": LR, "momentum": MOMENTUM, "weight_decay": WD, "bias_lr_mult": 2.0, "bias_decay_mult": 0.0},
            "train": {"batch_size": BATCH, "engine": engine, "zero_stage": zero_stage},
        }
    )


def grad_norm(module) -> float:
    """The 2-norm of every gradient of a serial model (its .grad after a DDPEngine step)."""
    return torch.sqrt(sum((p.grad.double() ** 2).sum() for p in module.parameters())).item()


def run_steps(engine, x, y, steps) -> list[float]:
    losses = []
    for step in steps:
        if step == SAVE_AFTER:
            engine.lr = LR * LR_DROP
        losses.append(engine.train_step(x, y).item())
    return losses


def serial_reference() -> dict:
    """The paper's net in this process on the whole batch, with the same schedule."""
    engine = DDPEngine(tiny_model(), make_cfg("ddp", tp=1), ParallelDims())
    x, y = data()
    losses, norms = [], []
    for step in range(STEPS):
        losses += run_steps(engine, x, y, [step])
        norms.append(grad_norm(engine.module))
    return {"losses": losses, "grad_norms": norms, "weights": full_state_dict(engine.module, None)}


# ---------------------------------------------------------------------------- worker


def local_batch(dims):
    x, y = data()
    per = BATCH // dims.dp
    return x[dims.dp_rank * per : (dims.dp_rank + 1) * per], y[dims.dp_rank * per : (dims.dp_rank + 1) * per]


def dp_mean(values: list[float], dims) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, group=dims.dp_group)
    return (t / dims.dp).tolist()


def local_state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def momentum(engine) -> list[torch.Tensor]:
    """The SGD momentum buffers ZeRO keeps for this rank's partition, in parameter-group order."""
    opt = engine.optimizer
    buffers = [opt.state[p].get("momentum_buffer") for g in opt.param_groups for p in g["params"]]
    return [None if b is None else b.clone() for b in buffers]


def save_checkpoint(engine, kind: str, dims, folder: str, layout: str) -> None:
    """A real checkpoint of ``engine`` after SAVE_AFTER steps, in folder/<kind>/step-00000002."""
    cfg = make_cfg("ddp" if kind == "ddp" else "deepspeed", dims.tp, 2 if kind == "zero2" else 1, layout)
    cfg.checkpoint.dir = os.path.join(folder, kind)
    CheckpointManager(cfg, dims).save(engine, TrainState(step=SAVE_AFTER, lr=LR * LR_DROP), RandomStreams())


def engines_worker(tp: int, folder: str, layout: str = "towers") -> dict:
    os.environ["DS_ACCELERATOR"] = "cpu"  # before deepspeed is first imported
    dims = init_parallel(tp=tp, towers=2, device="cpu", layout=layout)
    x, y = local_batch(dims)
    out = {
        "rank": dims.rank, "dp_rank": dims.dp_rank, "tp_rank": dims.tp_rank,
        "dp_ranks": tuple(dist.get_process_group_ranks(dims.dp_group)),
        "tp_ranks": tuple(dist.get_process_group_ranks(dims.tp_group)),
    }

    ddp = DDPEngine(parallelize(tiny_model(), dims.tp_group, layout), make_cfg("ddp", tp, layout=layout), dims)
    losses = run_steps(ddp, x, y, range(SAVE_AFTER))
    save_checkpoint(ddp, "ddp", dims, folder, layout)
    losses += run_steps(ddp, x, y, range(SAVE_AFTER, STEPS))
    out["ddp"] = {"local_losses": losses, "losses": dp_mean(losses, dims), "weights": full_state_dict(ddp.module, dims.tp_group)}

    from distalex.engine.deepspeed import DeepSpeedEngine

    for stage in STAGES:
        world_pg = dist.group.WORLD
        spy = CollectiveSpy().install()
        try:
            ds = DeepSpeedEngine(parallelize(tiny_model(), dims.tp_group, layout), make_cfg("deepspeed", tp, stage, layout), dims)
            losses, norms = [], []
            for step in range(STEPS):
                if step == SAVE_AFTER:
                    ds.lr = LR * LR_DROP  # (run_steps sets it here too)
                    shard = ds.shard_state()
                    save_checkpoint(ds, f"zero{stage}", dims, folder, layout)
                    saved = {"weights": local_state(ds.module), "momentum": momentum(ds)}
                losses += run_steps(ds, x, y, [step])
                norms.append(float(ds.model.get_global_grad_norm()))
        finally:
            spy.uninstall()
        res = {
            "same_world_group": dist.group.WORLD is world_pg,  # DeepSpeed did not re-init the group
            "zero_stage": ds.model.zero_optimization_stage(),
            "zero_dp_ranks": tuple(dist.get_process_group_ranks(ds.model.optimizer.dp_process_group)),
            "local_losses": losses,
            "losses": dp_mean(losses, dims),
            "grad_norms": norms,
            "group_lrs": [g["lr"] for g in ds.model.optimizer.optimizer.param_groups],  # what ZeRO steps with
            "weights": full_state_dict(ds.module, dims.tp_group),
            "local_weights": local_state(ds.module),
            # the checkpoint save's host-side agreements (control group) are distalex's, not DeepSpeed's
            "collectives": [(c.kind, c.ranks) for c in spy.calls if c.group is not dims.control_group],
            "shard_state": shard,
            "saved_weights": saved["weights"],
            "saved_partition": saved["momentum"],
        }
        # A freshly built engine (initial weights, no momentum) loads the shard state and runs the
        # second half; the caller sets the LR, as the training loop does.
        fresh = DeepSpeedEngine(parallelize(tiny_model(), dims.tp_group, layout), make_cfg("deepspeed", tp, stage, layout), dims)
        fresh.load_shard_state(*shard)
        res["loaded_weights_equal"] = all(torch.equal(v, saved["weights"][k]) for k, v in fresh.module.state_dict().items())
        loaded_momentum = momentum(fresh)
        res["loaded_momentum_equal"] = len(loaded_momentum) == len(saved["momentum"]) and all(
            a is not None and torch.equal(a, b) for a, b in zip(loaded_momentum, saved["momentum"])
        )
        res["momentum_nonzero"] = all(m is not None and m.abs().sum() > 0 for m in saved["momentum"])
        fresh.lr = LR * LR_DROP
        res["resumed_local_losses"] = run_steps(fresh, x, y, range(SAVE_AFTER, STEPS))
        res["resumed_local_weights"] = local_state(fresh.module)
        out[f"zero{stage}"] = res
    if tp == 1:  # last: DeepSpeed keeps process-wide state once its autocast is on
        out["bf16"] = bf16_step(dims, x, y)
    return out


def bf16_step(dims, x, y) -> dict:
    """The bf16 path CUDA takes, run on the CPU: bf16 inside the model, float32 loss and gradient
    averaging. (DeepSpeed's forward switches off an autocast opened outside it unless configured.)"""
    import distalex.engine.deepspeed as eds

    eds.autocast_dtype_for = lambda cfg, device: torch.bfloat16  # what CUDA gets; this process only
    engine = eds.DeepSpeedEngine(parallelize(tiny_model(), dims.tp_group), make_cfg("deepspeed", 1), dims)
    dtypes = {}

    def record(name):
        def hook(_module, _inputs, output):
            dtypes[name] = output.dtype

        return hook

    for name in ("conv1", "fc8"):
        getattr(engine.module, name).register_forward_hook(record(name))
    with torch.no_grad():
        engine.model(x)  # DeepSpeed's forward alone, no autocast opened outside it
    inner = dict(dtypes)
    loss = engine.train_step(x, y)
    return {
        "inner_activation_dtypes": inner,
        "activation_dtypes": dtypes,
        "loss_dtype": loss.dtype,
        "loss": loss.item(),
        "reduce_dtypes": set(engine.model.optimizer.ipg_buckets),
        "param_dtypes": {p.dtype for p in engine.module.parameters()},
    }


# ---------------------------------------------------------------------------- tests

# name: (world, tp, parallel.layout). Under hybrid the conv kernels are replicated over tp (their
# gradients summed over the tp group inside autograd) and DeepSpeed's norm counts them once.
LAYOUTS = {"dp2": (2, 1, "towers"), "dp2xtp2": (4, 2, "towers"), "hybrid-dp2xtp2": (4, 2, "hybrid")}


@pytest.fixture(scope="module")
def serial():
    return serial_reference()


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout(request, saved):
    world, tp, kind = LAYOUTS[request.param]
    folder = saved["root"] / request.param
    runs = run_workers(engines_worker, world, tp, str(folder), kind, timeout=240)
    saved[request.param] = (folder, runs)
    return request.param, runs


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """The layout runs' checkpoints and results, by layout name, as the layout fixture makes them."""
    return {"root": tmp_path_factory.mktemp("checkpoints")}


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() / b.abs().max().item()


@pytest.mark.parametrize("stage", STAGES)
def test_deepspeed_equals_ddp_and_serial(layout, serial, stage):
    name, runs = layout
    worst = {"loss": 0.0, "weight": 0.0}
    for run in runs:
        ds, ddp = run[f"zero{stage}"], run["ddp"]
        assert ds["zero_stage"] == stage
        assert ds["group_lrs"] == [LR * LR_DROP, 2 * LR * LR_DROP]  # the bias group kept its ratio
        for a, b in zip(ds["local_losses"], ddp["local_losses"]):
            worst["loss"] = max(worst["loss"], abs(a - b) / abs(b))
        assert worst["loss"] <= ENGINE_RTOL, (name, ds["local_losses"], ddp["local_losses"])
        assert ds["weights"].keys() == ddp["weights"].keys() == serial["weights"].keys()
        for k in serial["weights"]:
            worst["weight"] = max(worst["weight"], max_rel(ds["weights"][k], ddp["weights"][k]))
            assert worst["weight"] <= ENGINE_RTOL, f"{name} zero{stage} {k}: {worst['weight']:.2e} from ddp"
            assert_close_rel(ds["weights"][k], serial["weights"][k], f"{name} zero{stage} weight {k} vs serial")
            assert_close_rel(ddp["weights"][k], serial["weights"][k], f"{name} ddp weight {k} vs serial")
        assert_close_rel(torch.tensor(ds["losses"]), torch.tensor(serial["losses"]), f"{name} zero{stage} losses")
        assert_close_rel(torch.tensor(ddp["losses"]), torch.tensor(serial["losses"]), f"{name} ddp losses")
        # The norm counts each sharded parameter over the tp group and each replicated one once.
        assert_close_rel(torch.tensor(ds["grad_norms"]), torch.tensor(serial["grad_norms"]), f"{name} zero{stage} grad norm")
    assert serial["losses"][-1] < serial["losses"][0]  # the steps did something
    print(f"\n{name} zero{stage}: max rel diff vs ddp: loss {worst['loss']:.2e}, weight {worst['weight']:.2e}")


@pytest.mark.parametrize("stage", STAGES)
def test_averaging_is_over_dp_only(layout, stage):
    name, runs = layout
    for run in runs:
        ds = run[f"zero{stage}"]
        assert ds["same_world_group"]
        assert ds["zero_dp_ranks"] == run["dp_ranks"]
        # DeepSpeed's own collectives (start-up broadcast, gradient reduction, weight all-gather,
        # norm) are on the dp group or the tp group; the world group only sees barriers.
        groups = {ranks for _, ranks in ds["collectives"]}
        assert run["dp_ranks"] in groups
        world = tuple(range(len(runs)))
        if world not in (run["dp_ranks"], run["tp_ranks"]):
            assert {kind for kind, ranks in ds["collectives"] if ranks == world} <= {"barrier"}, ds["collectives"]
            assert groups <= {run["dp_ranks"], run["tp_ranks"], world}
    for a in runs:
        for b in runs:
            wa, wb = a[f"zero{stage}"]["local_weights"], b[f"zero{stage}"]["local_weights"]
            if a["tp_rank"] == b["tp_rank"]:  # dp copies of the same towers: identical
                assert all(torch.equal(wa[k], wb[k]) for k in wa), (name, a["rank"], b["rank"])
            else:  # the other tower: different kernels (never broadcast over, never averaged in)
                assert not torch.equal(wa["fc7.weight"], wb["fc7.weight"]), (name, a["rank"], b["rank"])
                # hybrid: every rank holds all conv kernels, kept equal by the tp-summed gradient
                assert torch.equal(wa["conv1.weight"], wb["conv1.weight"]) == (LAYOUTS[name][2] == "hybrid"), (name, a["rank"], b["rank"])


@pytest.mark.parametrize("stage", STAGES)
def test_resume_equals_uninterrupted(layout, stage):
    name, runs = layout
    for run in runs:
        ds = run[f"zero{stage}"]
        assert ds["momentum_nonzero"] and ds["loaded_momentum_equal"], name
        assert ds["loaded_weights_equal"], name
        assert ds["resumed_local_losses"] == ds["local_losses"][SAVE_AFTER:], name
        for k, v in ds["local_weights"].items():
            assert torch.equal(ds["resumed_local_weights"][k], v), f"{name} zero{stage} {k}"
        # The shard state a checkpoint stores: this rank's weights, and its momentum whole over dp.
        model, full_momentum = ds["shard_state"]
        assert model.keys() == ds["saved_weights"].keys() == full_momentum.keys()
        assert all(torch.equal(model[k], ds["saved_weights"][k]) for k in model)
        for peer in runs:  # every dp rank of the tp group reports the same whole momentum ...
            if peer["tp_rank"] == run["tp_rank"]:
                other = peer[f"zero{stage}"]["shard_state"][1]
                assert all(torch.equal(other[k], full_momentum[k]) for k in full_momentum)
        # ... which is exactly the dp ranks' partitions put together (their squares add up)
        parts = sum(sum(float((m.double() ** 2).sum()) for m in peer[f"zero{stage}"]["saved_partition"])
                    for peer in runs if peer["tp_rank"] == run["tp_rank"])
        whole = sum(float((m.double() ** 2).sum()) for m in full_momentum.values())
        assert whole == pytest.approx(parts, rel=1e-12) and whole > 0


def test_bf16_computes_in_bf16_and_averages_in_fp32(layout):
    name, runs = layout
    if "bf16" not in runs[0]:
        assert LAYOUTS[name][1] > 1  # checked at tp=1 only (the dp2 layout)
        return
    for run in runs:
        bf16 = run["bf16"]
        # DeepSpeed's forward autocasts by itself (on CUDA it would switch an outer autocast off)
        assert bf16["inner_activation_dtypes"] == {"conv1": torch.bfloat16, "fc8": torch.bfloat16}
        assert bf16["activation_dtypes"] == {"conv1": torch.bfloat16, "fc8": torch.bfloat16}
        assert bf16["loss_dtype"] == torch.float32
        assert bf16["reduce_dtypes"] == {torch.float32}
        assert bf16["param_dtypes"] == {torch.float32}
        fp32 = run["ddp"]["local_losses"][0]
        assert bf16["loss"] != fp32 and abs(bf16["loss"] - fp32) < 0.05 * fp32, (bf16["loss"], fp32)


# ---------------------------------------------------------------------------- resume at another layout
#
# The dp=2 x tp=2 run above saved a checkpoint of each engine after SAVE_AFTER steps. Each is
# resumed at dp=1 x tp=2, dp=2 x tp=1 and dp=1 x tp=1 (and the DDP one also by ZeRO-1: both write
# the same format): the shards are joined into the serial layout and split for the new tp, ZeRO cuts
# the momentum for the new dp. The second half then runs on the same global batch, split over the
# new dp, so it must end where the uninterrupted dp=2 x tp=2 run ended, to RTOL (the reductions'
# summation order differs with the layout, as in the parity tests).

TARGETS = {"dp1xtp2": (2, 2), "dp2xtp1": (2, 1), "dp1xtp1": (1, 1)}  # world, tp
CHANGES = {"dp1xtp2": ["dp 2 -> 1"], "dp2xtp1": ["tp 2 -> 1"], "dp1xtp1": ["dp 2 -> 1", "tp 2 -> 1"]}
RESUMES = {"ddp": "ddp", "zero1": "zero1", "zero2": "zero2", "ddp->zero1": "ddp"}  # engine -> checkpoint


def engine_for(kind: str, dims):
    from distalex.engine.deepspeed import DeepSpeedEngine

    if kind == "ddp":
        return DDPEngine(parallelize(tiny_model(), dims.tp_group), make_cfg("ddp", dims.tp), dims)
    stage = 2 if kind == "zero2" else 1
    return DeepSpeedEngine(parallelize(tiny_model(), dims.tp_group), make_cfg("deepspeed", dims.tp, stage), dims)


def resume_worker(tp: int, folder: str) -> dict:
    os.environ["DS_ACCELERATOR"] = "cpu"
    dims = init_parallel(tp=tp, towers=2, device="cpu")
    x, y = local_batch(dims)
    out = {}
    for name, ckpt in RESUMES.items():
        engine = engine_for(name.split("->")[-1], dims)
        cfg = make_cfg("ddp", tp)  # the checkpoint's batch size and seed; the engine does not matter
        step = os.path.join(folder, ckpt, f"step-{SAVE_AFTER:08d}")
        resumed = CheckpointManager(cfg, dims).load(Path(step), engine, TrainState(), RandomStreams())
        model, momentum = engine.shard_state()
        partition = partition_map(engine.module)
        loaded_momentum = {n: gather_full(m, partition[n] is not None, partition[n] or 0, dims.tp_group) for n, m in momentum.items()}
        engine.lr = LR * LR_DROP
        run_steps(engine, x, y, range(SAVE_AFTER, STEPS))
        out[name] = {"changes": resumed.layout_changes, "momentum": loaded_momentum,
                     "weights": full_state_dict(engine.module, dims.tp_group)}
    return out


@pytest.fixture(scope="module", params=list(TARGETS))
def resumed(request, saved):
    if "dp2xtp2" not in saved:  # normally made by the layout tests, which run first
        saved["dp2xtp2"] = (saved["root"] / "dp2xtp2", run_workers(engines_worker, 4, 2, str(saved["root"] / "dp2xtp2"), timeout=240))
    folder, runs = saved["dp2xtp2"]
    world, tp = TARGETS[request.param]
    return request.param, runs, folder, run_workers(resume_worker, world, tp, str(folder), timeout=240)


@pytest.mark.parametrize("kind", list(RESUMES))
def test_resume_at_another_layout_continues_the_run(resumed, kind):
    target, runs, folder, results = resumed
    ckpt = folder / RESUMES[kind] / f"step-{SAVE_AFTER:08d}"
    serial = load_serial_state(ckpt)[0]
    shards = [torch.load(shard_file(ckpt, r), weights_only=True)["momentum"] for r in range(2)]
    serial_momentum = join_shards(ckpt, read_meta(ckpt)["partition"], shards)
    uninterrupted = runs[0]["ddp" if kind.startswith("ddp") else kind]["weights"]
    assert serial.keys() == uninterrupted.keys()
    for result in results:
        r = result[kind]
        assert r["changes"] == CHANGES[target]
        for name, m in serial_momentum.items():  # the momentum, re-cut for this layout, is the saved one
            assert m is not None and torch.equal(r["momentum"][name], m), f"{target} {kind} momentum {name}"
        for name, w in uninterrupted.items():
            assert_close_rel(r["weights"][name], w, f"{target} {kind} weight {name} vs the uninterrupted run")
        assert not torch.equal(r["weights"]["fc8.weight"], serial["fc8.weight"])  # the second half did train


# ---------------------------------------------------------------------------- a batch dp does not divide
#
# dp=3 (3 processes, tp=1) with a global batch of UNEVEN = 10: the dp ranks take 4, 3 and 3 images and
# weight their losses by dp * b / B (Engine.loss). ZeRO averages the gradients over dp as DDP does, so
# both engines take the serial step on the 10 images.

UNEVEN = 10


def uneven_cfg(kind: str) -> Config:
    cfg = make_cfg("ddp" if kind == "ddp" else "deepspeed", tp=1, zero_stage=2 if kind == "zero2" else 1)
    cfg.train.batch_size = UNEVEN
    return cfg


def uneven_engine(kind: str, dims):
    from distalex.engine.deepspeed import DeepSpeedEngine

    engine_class = DDPEngine if kind == "ddp" else DeepSpeedEngine
    return engine_class(parallelize(tiny_model(), dims.tp_group), uneven_cfg(kind), dims)


def uneven_worker() -> dict:
    os.environ["DS_ACCELERATOR"] = "cpu"
    dims = init_parallel(tp=1, towers=2, device="cpu")
    x, y = data(UNEVEN)
    first, size = dims.dp_batch_offset(UNEVEN), dims.per_dp_batch(UNEVEN)
    x, y = x[first : first + size], y[first : first + size]
    out = {"batch": size}
    for kind in ("ddp", "zero1", "zero2"):
        engine = uneven_engine(kind, dims)
        losses = run_steps(engine, x, y, range(STEPS))
        out[kind] = {"losses": dp_mean(losses, dims), "weights": full_state_dict(engine.module, dims.tp_group)}
    return out


def test_uneven_dp_split_deepspeed_equals_ddp_and_serial():
    runs = run_workers(uneven_worker, 3, timeout=300)
    assert [run["batch"] for run in runs] == [4, 3, 3]
    engine = DDPEngine(tiny_model(), uneven_cfg("ddp"), ParallelDims())
    ref_losses = run_steps(engine, *data(UNEVEN), range(STEPS))
    ref_weights = full_state_dict(engine.module, None)
    assert ref_losses[-1] < ref_losses[0]  # the steps did something
    for run in runs:
        for kind in ("zero1", "zero2"):
            worst = max(max_rel(run[kind]["weights"][k], run["ddp"]["weights"][k]) for k in ref_weights)
            assert worst <= ENGINE_RTOL, f"{kind}: weights {worst:.2e} from ddp's"
        for kind in ("ddp", "zero1", "zero2"):
            assert_close_rel(torch.tensor(run[kind]["losses"]), torch.tensor(ref_losses), f"{kind} logged losses vs serial")
            for k, w in ref_weights.items():
                assert_close_rel(run[kind]["weights"][k], w, f"{kind} weight {k} vs serial")
