"""Bytes each tensor-parallel collective moves in one training step of the paper's net, measured.

    python bench/comm_bytes.py [--batch 128] [--dp 1,2] [--results bench/RESULTS.md]

The paper's AlexNet (width 1, 224 input, 2 towers) with tp=2 runs one real training step on
gloo CPU processes (spawned like tests/distributed.py: dp x 2 of them), through the code a run
uses: ``TrainLoader`` on JPEG shards (its uint8 batch broadcast over the tp group), ``normalize``,
``build_parallel_model`` and the engine's ``train_step`` (forward, backward, SGD), and the loop's
per-step stop flag. A spy (distalex/parallel/trace.py) wraps every torch.distributed collective and records its
kind, group, tensors (shape, dtype), phase and layer; nothing is computed by hand.

Global batch ``--batch`` (the paper: 128) is split over dp: dp=1 is one tp pair with 128 images,
dp=2 two pairs with 64 each, plus DDP's gradient all-reduce over the dp group (seen through a
comm hook that does what DDP's default one does).

Two byte counts per call: "tensor" is the whole tensor the collective is about (all-reduce and
broadcast: the buffer; all-gather: its output; reduce-scatter: its input); "sent/rank" is what
each rank puts on the wire with a ring algorithm: all-reduce 2(n-1)/n, all-gather and
reduce-scatter (n-1)/n of it; a broadcast's root sends it all (its n=2 peer sends nothing).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from results import RESULTS_MD, provenance, write_section  # noqa: E402
from distalex.parallel.trace import Call  # noqa: E402

TP = 2


def make_jpeg_shards(n: int, out: Path) -> Path:
    """``n`` ImageNet-like JPEGs (bench/data.py's) as training shards of one class each."""
    from data import imagenet_like

    from distalex.data.make_shards import make_shards

    src = out / "src"
    for split in ("train", "val"):
        for c in range(2):
            (src / split / f"n{c:08d}").mkdir(parents=True)
    jpegs = imagenet_like(n)
    for i, data in enumerate(jpegs):
        (src / "train" / f"n{i % 2:08d}" / f"img_{i:06d}.JPEG").write_bytes(data)
    for c in range(2):
        (src / "val" / f"n{c:08d}" / "v.JPEG").write_bytes(jpegs[c])
    make_shards(src, out / "shards", max_count=max(1, n // 2), workers=1, stats_samples=16)
    return out / "shards"


def step_worker(global_batch: int, shards: str) -> dict:
    """One training step on this rank, under the spy. Runs in a spawned process."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch.distributed as dist
    from distalex.parallel.trace import CollectiveSpy, label_layers, recording_allreduce_hook

    from distalex.config import load_config
    from distalex.data.augment import normalize
    from distalex.data.loader import TrainLoader
    from distalex.engine import build_engine
    from distalex.parallel.dims import init_parallel
    from distalex.stopping import StopAgreement, StopRequested
    from distalex.train import build_parallel_model

    cfg = load_config(None, [
        f"train.batch_size={global_batch}", f"parallel.tp={TP}", "parallel.device=cpu",
        f"data.train_shards={shards}", "data.workers=0", "data.shuffle_buffer=0", "model.num_classes=1000",
    ])
    dims = init_parallel(tp=TP, towers=cfg.model.towers, device="cpu")
    batch = dims.per_dp_batch(cfg.train.batch_size)
    loader = TrainLoader(cfg.data, dims, batch, cfg.model.image_size, cfg.train.seed)
    model = build_parallel_model(cfg, dims)
    engine = build_engine(model, cfg, dims)
    lighting = torch.Generator().manual_seed(cfg.train.seed)
    local_param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    agree = StopAgreement(StopRequested(), dims)
    spy = CollectiveSpy()
    if dims.dp_enabled:
        engine.model.register_comm_hook(None, recording_allreduce_hook(dims.dp_group, spy))
    t0 = time.perf_counter()
    with spy:
        label_layers(model, spy)
        spy.phase, spy.layer = "data", "input batch (TrainLoader)"
        b = next(iter(loader.epoch(0)))
        x = normalize(b.images, train=True, data_cfg=cfg.data, generator=lighting)
        engine.train_step(x, b.labels)  # the hooks set phase fwd / bwd and the layer
        spy.phase, spy.layer = "loop", "stop flag (StopAgreement, not waited for)"
        agree.after_step()
    wall = time.perf_counter() - t0
    agree.now()  # collects the agreement started in the step
    return {
        "rank": dims.rank, "dp": dims.dp, "tp": dims.tp, "per_rank_batch": batch, "wall_s": wall,
        "tp_ranks": tuple(dist.get_process_group_ranks(dims.tp_group)),
        "dp_ranks": tuple(dist.get_process_group_ranks(dims.dp_group)) if dims.dp_enabled else (),
        "local_param_bytes": local_param_bytes,
        "calls": [(c.kind, c.ranks, c.phase, c.layer, [(s, str(d).removeprefix("torch.")) for s, d in c.tensors]) for c in spy.calls],
    }


def _call(raw) -> Call:
    kind, ranks, phase, layer, tensors = raw
    return Call(kind, tuple(ranks), phase, layer, [(tuple(s), getattr(torch, d)) for s, d in tensors])


def human(n: float) -> str:
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= f:
            return f"{n / f:.2f} {unit}"
    return f"{n:.0f} B"


def group_name(ranks, run) -> str:
    if tuple(ranks) == tuple(run["tp_ranks"]):
        return "tp"
    if tuple(ranks) == tuple(run["dp_ranks"]):
        return "dp"
    return "world"


def table(run: dict, scale: float) -> tuple[str, dict]:
    """A markdown table of rank 0's calls, and the totals by group."""
    lines = ["| layer | collective | dir | group | tensor (shape, dtype) | tensor bytes | sent/rank (ring) |",
             "|---|---|---|---|---|---:|---:|"]
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    dp_buckets = []
    for raw in run["calls"]:
        c = _call(raw)
        g = "control" if c.phase == "loop" else group_name(c.ranks, run)  # dims.control_group: the world on CPU
        activation = g == "tp"  # activations and the input batch scale with the batch; params do not
        f = scale if activation and c.phase in ("fwd", "bwd", "data") else 1.0
        full, sent = int(c.full_bytes * f), int(c.sent_bytes * f)
        key = {"fwd": "tp model", "bwd": "tp model", "data": "tp input batch"}.get(c.phase, g) if g == "tp" else g
        totals[key][0] += full
        totals[key][1] += sent
        if g == "dp":
            dp_buckets.append((c, full, sent))
            continue  # one summary row for the buckets below
        shape = " + ".join(f"{tuple(s)} {str(d).removeprefix('torch.')}" for s, d in c.tensors[:1]) if c.kind == "all_reduce" or c.kind == "broadcast" \
            else f"out {tuple(c.tensors[0][0])}, in {tuple(c.tensors[1][0])} {str(c.tensors[0][1]).removeprefix('torch.')}"
        lines.append(f"| {c.layer} | {c.kind} | {c.phase} | {g} {list(c.ranks)} | {shape} | {full:,} ({human(full)}) | {sent:,} ({human(sent)}) |")
    if dp_buckets:
        full = sum(b[1] for b in dp_buckets)
        sent = sum(b[2] for b in dp_buckets)
        ranks = list(dp_buckets[0][0].ranks)
        lines.append(f"| all parameters (DDP buckets on the first step: {len(dp_buckets)}) | all_reduce | bwd | dp {ranks} | "
                     f"{full // 4:,} float32 gradients | {full:,} ({human(full)}) | {sent:,} ({human(sent)}) |")
    return "\n".join(lines), dict(totals)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=128, help="global batch to run (the paper: 128)")
    p.add_argument("--report-batch", type=int, default=128,
                   help="global batch to report; activation bytes are scaled linearly from --batch when they differ")
    p.add_argument("--dp", default="1,2", help="data-parallel degrees to run, comma-separated (world = dp x 2)")
    p.add_argument("--results", default=str(RESULTS_MD), help="RESULTS.md to update ('' to skip)")
    p.add_argument("--timeout", type=float, default=900)
    a = p.parse_args(argv)
    from tests.distributed import run_workers

    from distalex.model import AlexNet, count_parameters

    prov = provenance(argv)
    full_param_bytes = count_parameters(AlexNet()) * 4
    scale = a.report_batch / a.batch
    out = [f"Measured on: {prov['machine']}; {prov['date']}; commit {prov['commit']}; torch {prov['torch']}.",
           f"Command: `{prov['command']}`", "",
           'Columns: "tensor bytes" is the whole tensor a collective is about (all-reduce, broadcast: the buffer; all-gather: its output; reduce-scatter: its input); "sent/rank (ring)" is what each rank puts on the wire with a ring algorithm, 2(n-1)/n of it for an all-reduce and (n-1)/n for all-gather and reduce-scatter; a broadcast\'s root sends all of it (with n=2 its peer sends nothing). dir: fwd/bwd of the training step, data = the TrainLoader\'s batch broadcast, loop = the per-step stop flag.', ""]
    if scale != 1:
        out.append(f"**Run at global batch {a.batch} and scaled linearly to {a.report_batch}** (activation and input "
                   "collectives only; the dp gradient all-reduce does not depend on the batch).\n")
    summary = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        shards = make_jpeg_shards(a.batch, Path(tmp))
        print(f"shards of {a.batch} JPEGs in {time.perf_counter() - t0:.1f}s", flush=True)
        for dp in (int(d) for d in a.dp.split(",") if d):
            t0 = time.perf_counter()
            runs = run_workers(step_worker, dp * TP, a.batch, str(shards), timeout=a.timeout)
            wall = time.perf_counter() - t0
            # Every rank of a tp group makes the same calls on tensors of the same size.
            sig = lambda r: [(k, ph, ly, [s for s, _ in ts]) for k, _, ph, ly, ts in r["calls"]]  # noqa: E731
            same = all(sig(r) == sig(runs[0]) for r in runs)
            run = runs[0]
            text, totals = table(run, scale)
            local = run["local_param_bytes"]
            head = (f"### dp={dp} x tp={TP}: {dp * TP} ranks, {a.report_batch // dp} images per tp pair "
                    f"(rank 0's calls; {'every rank made the same calls' if same else 'RANKS DIFFER, see JSON'})")
            model_sent = totals.get("tp model", [0, 0])[1]
            tp_all_sent = model_sent + totals.get("tp input batch", [0, 0])[1]
            lines = [head, "", text, "",
                     f"Totals per rank per step (tensor bytes / sent per rank):"]
            for key in ("tp model", "tp input batch", "dp", "control", "world"):
                if key in totals:
                    fb, sb = totals[key]
                    lines.append(f"- {key}: {fb:,} ({human(fb)}) / {sb:,} ({human(sb)})")
            lines += [
                f"- parameters: {full_param_bytes:,} B float32 in the whole net ({human(full_param_bytes)}), "
                f"{local:,} B ({human(local)}) on each rank",
                f"- tp model collectives, sent/rank ÷ whole-net parameter bytes = {model_sent / full_param_bytes:.3f}; "
                f"÷ this rank's parameter bytes = {model_sent / local:.3f}",
                f"- tp total incl. input broadcast, sent/rank ÷ whole-net parameter bytes = {tp_all_sent / full_param_bytes:.3f}",
            ]
            if "dp" in totals:
                lines.append(f"- dp gradient all-reduce tensor bytes = {totals['dp'][0]:,} = this rank's parameter bytes "
                             f"{'(equal)' if totals['dp'][0] == local else '(DIFFER)'}")
            lines.append(f"- wall: {wall:.0f} s for the spawn and the step (step itself {max(r['wall_s'] for r in runs):.1f} s on the slowest rank)")
            block = "\n".join(lines)
            print("\n" + block, flush=True)
            out += [block, ""]
            summary.append((dp, totals))
    out.append("The step's other collectives: the loss is read (and averaged over dp) every `train.log_every` steps, "
               "not every step, so it is not in this table. The table's tp rows are fixed per step; the "
               "sizes scale linearly with the images per tp pair.")
    if a.results:
        write_section("Tensor-parallel communication per step", "\n".join(out), Path(a.results))
        print(f"\nwrote {a.results}")


if __name__ == "__main__":
    main()
