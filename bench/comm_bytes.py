"""Bytes each collective moves in one training step of the paper's net, both layouts, measured.

    python bench/comm_bytes.py [--batch 128] [--grid 1x2,2x2,1x4] [--layouts towers,hybrid] [--results bench/RESULTS.md]

The paper's AlexNet (width 1, 224 input, 2 towers, 1000 classes) runs one real training step per
layout (``parallel.layout``: towers or hybrid) and dp x tp grid on gloo CPU processes (spawned like
tests/distributed.py), through the code a run uses: ``TrainLoader`` on JPEG shards (its uint8
batch broadcast, or scattered under hybrid, over the tp group), ``normalize``,
``build_parallel_model`` and the engine's ``train_step`` (forward, backward, SGD), and the loop's
per-step stop flag. A spy (distalex/parallel/trace.py) wraps every torch.distributed collective
and records its kind, group, tensors (shape, dtype), phase and layer.

Global batch ``--batch`` (the paper: 128) is split over dp: 1x2 is one tp pair with 128 images,
2x2 two pairs with 64 each, plus DDP's gradient all-reduce over the dp group (seen through a
comm hook that does what DDP's default one does). The towers layout needs tp to divide the 2
towers, so it has no 1x4 run.

Two byte counts per call: "tensor" is the whole tensor the collective is about (all-reduce and
broadcast: the buffer; all-gather: its output; reduce-scatter: its input; scatter: all pieces;
all-to-all: this rank's input); "sent/rank" is what each rank puts on the wire with a ring
algorithm (``trace.Call.sent_bytes``): all-reduce 2(n-1)/n, all-gather, reduce-scatter and
all-to-all (n-1)/n of it; a broadcast's root sends it all and a scatter's root (n-1)/n (their
peers send nothing). Beside each layer's measurement is the layout's arithmetic from the
model's shapes (``expected_sent``): a difference would mean an exchange the argument does not
count, or one missing.
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
from distalex.model import AlexNet, count_parameters, feature_map_sizes  # noqa: E402
from distalex.parallel.plan import CONVS  # noqa: E402
from distalex.parallel.trace import Call  # noqa: E402

LAYOUTS = ("towers", "hybrid")


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


def step_worker(global_batch: int, shards: str, tp: int, layout: str) -> dict:
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
    from distalex.build import build_parallel_model

    cfg = load_config(None, [
        f"train.batch_size={global_batch}", f"parallel.tp={tp}", f"parallel.layout={layout}", "parallel.device=cpu",
        f"data.train_shards={shards}", "data.workers=0", "data.shuffle_buffer=0", "model.num_classes=1000",
    ])
    dims = init_parallel(tp=tp, towers=cfg.model.towers, device="cpu", layout=layout)
    loader = TrainLoader(cfg.data, dims, cfg.train.batch_size, cfg.model.image_size, cfg.train.seed)
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
        "rank": dims.rank, "dp": dims.dp, "tp": dims.tp, "per_rank_batch": loader.batch_size, "wall_s": wall,
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


def row_key(c: Call, g: str) -> str:
    """The summary's row for a call: the layer for the tp model's exchanges, else what it is."""
    if g == "tp":
        return "input batch" if c.phase == "data" else c.layer
    return {"dp": "dp gradients", "control": "stop flag"}.get(g, g)


def table(run: dict) -> tuple[str, dict]:
    """A markdown table of rank 0's calls, and the sent bytes per summary row."""
    lines = ["| layer | collective | dir | group | tensor (shape, dtype) | tensor bytes | sent/rank (ring) |",
             "|---|---|---|---|---|---:|---:|"]
    sent_by: dict[str, int] = defaultdict(int)
    dp_buckets = []
    for raw in run["calls"]:
        c = _call(raw)
        g = "control" if c.phase == "loop" else group_name(c.ranks, run)  # dims.control_group: the world on CPU
        sent_by[row_key(c, g)] += c.sent_bytes
        if g == "dp":
            dp_buckets.append(c)
            continue  # one summary row for the buckets below
        dtype = str(c.tensors[0][1]).removeprefix("torch.")
        shape = f"{tuple(c.tensors[0][0])} {dtype}" if c.kind in ("all_reduce", "broadcast") \
            else f"out {tuple(c.tensors[0][0])}, in {tuple(c.tensors[1][0]) if len(c.tensors) > 1 else '-'} {dtype}"
        lines.append(f"| {c.layer} | {c.kind} | {c.phase} | {g} {list(c.ranks)} | {shape} | "
                     f"{c.full_bytes:,} ({human(c.full_bytes)}) | {c.sent_bytes:,} ({human(c.sent_bytes)}) |")
    if dp_buckets:
        full = sum(b.full_bytes for b in dp_buckets)
        sent = sum(b.sent_bytes for b in dp_buckets)
        lines.append(f"| all parameters (DDP buckets on the first step: {len(dp_buckets)}) | all_reduce | bwd | "
                     f"dp {list(dp_buckets[0].ranks)} | {full // 4:,} float32 gradients | {full:,} ({human(full)}) | "
                     f"{sent:,} ({human(sent)}) |")
    return "\n".join(lines), dict(sent_by)


def expected_sent(layout: str, tp: int, images: int, model: AlexNet) -> dict[str, int]:
    """What each rank of a tp group sends per step by the layout's arithmetic, per summary row:
    float32 activations and gradients, ring algorithms (as ``trace.Call.sent_bytes`` rounds them),
    ``images`` per tp group, the uint8 batch and int64 labels (+ the skipped count) from tp rank 0.

    Both: fc6 and fc8 all-reduce (images, units) forward, fc7 its input gradient backward.
    towers: conv3 all-gathers conv2's channels and reduce-scatters their gradient, both
    (images, conv2 channels, side, side). hybrid: every conv all-reduces its weight and bias
    gradients (independent of the batch); fc6 regroups (images/tp, features) all-to-all each way;
    the images are scattered, not broadcast.
    """
    n, f32 = tp, 4
    ring = lambda size: (n - 1) * size // n  # noqa: E731 - all-gather, reduce-scatter, all-to-all, scatter
    fc, classes = model.fc6.out_features, model.fc8.out_features
    batch_bytes = images * 3 * model.image_size**2
    out = {"fc6": 2 * ring(images * fc * f32), "fc7": 2 * ring(images * fc * f32), "fc8": 2 * ring(images * classes * f32)}
    if layout == "towers":
        side = feature_map_sizes(model.image_size)["pool2"]
        out["conv3"] = 2 * ring(images * model.conv2.out_channels * side * side * f32)
        out["input batch"] = batch_bytes + (images + 1) * 8
    else:
        for name in CONVS:
            out[name] = sum(2 * ring(p.numel() * f32) for p in getattr(model, name).parameters())
        out["fc6"] += 2 * ring(images // n * model.fc6.in_features * f32)
        out["input batch"] = ring(batch_bytes) + (images + 1) * 8
    return out


def mb(n: float) -> str:
    return f"{n / 1e6:.2f}"


def comparison(results: dict, model: AlexNet, batch: int) -> list[str]:
    """The summary: per layer, MB sent per rank per step, measured (expected), each layout and grid."""
    cols = list(results)  # (layout, dp, tp), in run order
    order = ["input batch", *CONVS, "fc6", "fc7", "fc8"]
    head = " | ".join(f"{layout} {dp}x{tp}" for layout, dp, tp in cols)
    lines = [f"| layer (MB sent per rank per step) | {head} |", "|---|" + "---:|" * len(cols)]
    agree = True
    totals = {col: [0, 0] for col in cols}
    for key in order:
        cells = []
        for col in cols:
            layout, dp, tp = col
            got = results[col].get(key, 0)
            want = expected_sent(layout, tp, batch // dp, model).get(key, 0)
            agree &= got == want
            if key != "input batch":
                totals[col][0] += got
                totals[col][1] += want
            cells.append("-" if not got and not want else mb(got) if got == want else f"**{mb(got)} (expected {mb(want)})**")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines.append("| **tp model total** | " + " | ".join(f"**{mb(totals[c][0])}**" for c in cols) + " |")
    lines.append("| dp gradients (DDP, over dp) | " + " | ".join(mb(results[c].get("dp gradients", 0)) if c[1] > 1 else "-" for c in cols) + " |")
    lines += ["", "Each cell is rank 0's measurement; where it differs from the layout's arithmetic "
              "(`expected_sent`) the expectation follows in bold. " + (
                  "**Every measured cell equals the arithmetic**: the layouts exchange exactly what the argument counts."
                  if agree else "**Some cells differ from the arithmetic** (bold).")]
    return lines


def crossover(results: dict, batch: int) -> str | None:
    """The images per tp pair below which towers sends less than hybrid, from the 1x2 and 2x2 runs:
    each layout's tp model bytes are c + s * images (two measured points)."""
    fits = {}
    for layout in LAYOUTS:
        pts = [(batch // dp, sum(v for k, v in results[(layout, dp, 2)].items() if k in (*CONVS, "fc6", "fc7", "fc8")))
               for dp in (1, 2) if (layout, dp, 2) in results]
        if len(pts) < 2:
            return None
        (b1, y1), (b2, y2) = pts
        slope = (y1 - y2) / (b1 - b2)
        fits[layout] = (y1 - slope * b1, slope)
    (ct, st), (ch, sh) = fits["towers"], fits["hybrid"]
    if st <= sh:
        return None
    b = (ch - ct) / (st - sh)
    return (f"Fitted to the 1x2 and 2x2 runs, tp model bytes per rank per step at tp=2 are towers "
            f"{ct / 1e6:.2f} MB + {st / 1e3:.1f} kB x images and hybrid {ch / 1e6:.2f} MB + {sh / 1e3:.1f} kB x images "
            f"(images per tp pair): hybrid sends less above **{b:.0f} images per tp pair**, towers below.")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=128, help="global batch (the paper: 128)")
    p.add_argument("--grid", default="1x2,2x2,1x4", help="dp x tp grids, comma-separated (world = dp x tp)")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="parallel.layout values, comma-separated")
    p.add_argument("--results", default=str(RESULTS_MD), help="RESULTS.md to update ('' to skip)")
    p.add_argument("--timeout", type=float, default=900)
    a = p.parse_args(argv)
    from tests.distributed import run_workers

    prov = provenance(argv)
    model = AlexNet()
    full_param_bytes = count_parameters(model) * 4
    out = [f"Measured on: {prov['machine']}; {prov['date']}; commit {prov['commit']}; torch {prov['torch']}.",
           f"Command: `{prov['command']}`", "",
           'Columns: "tensor bytes" is the whole tensor a collective is about (all-reduce, broadcast: the buffer; all-gather: its output; reduce-scatter: its input; scatter: all pieces; all-to-all: this rank\'s input); "sent/rank (ring)" is what each rank puts on the wire with a ring algorithm, 2(n-1)/n of it for an all-reduce and (n-1)/n for all-gather, reduce-scatter and all-to-all; a broadcast\'s root sends all of it, a scatter\'s root (n-1)/n (their peers send nothing). dir: fwd/bwd of the training step, data = the TrainLoader\'s batch to the tp peers, loop = the per-step stop flag.', ""]
    grids = [tuple(int(v) for v in g.split("x")) for g in a.grid.split(",") if g]
    results: dict[tuple[str, int, int], dict[str, int]] = {}
    sections = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        shards = make_jpeg_shards(a.batch, Path(tmp))
        print(f"shards of {a.batch} JPEGs in {time.perf_counter() - t0:.1f}s", flush=True)
        for dp, tp in grids:
            for layout in (v for v in a.layouts.split(",") if v):
                if layout == "towers" and model.towers % tp:
                    print(f"towers {dp}x{tp}: skipped, tp={tp} does not divide the paper's {model.towers} towers", flush=True)
                    continue
                t0 = time.perf_counter()
                runs = run_workers(step_worker, dp * tp, a.batch, str(shards), tp, layout, timeout=a.timeout)
                wall = time.perf_counter() - t0
                # Every rank of a tp group makes the same calls on tensors of the same size (the first
                # tensor: a scatter's root also passes the pieces).
                sig = lambda r: [(k, ph, ly, ts[0][0] if ts else None) for k, _, ph, ly, ts in r["calls"]]  # noqa: E731
                same = all(sig(r) == sig(runs[0]) for r in runs)
                run = runs[0]
                text, sent_by = table(run)
                results[(layout, dp, tp)] = sent_by
                local = run["local_param_bytes"]
                head = (f"### {layout}, dp={dp} x tp={tp}: {dp * tp} ranks, {a.batch // dp} images per tp group "
                        f"(rank 0's calls; {'every rank made the same calls' if same else 'RANKS DIFFER, see JSON'})")
                lines = [head, "", text, "",
                         f"- parameters: {full_param_bytes:,} B float32 in the whole net ({human(full_param_bytes)}), "
                         f"{local:,} B ({human(local)}) on each rank",
                         f"- wall: {wall:.0f} s for the spawn and the step (step itself "
                         f"{max(r['wall_s'] for r in runs):.1f} s on the slowest rank)"]
                if dp > 1:
                    lines.append(f"- dp gradient all-reduce: {sent_by.get('dp gradients', 0):,} B sent per rank "
                                 f"(this rank's parameter bytes {local:,}: every local gradient once, 2(n-1)/n of it)")
                block = "\n".join(lines)
                print("\n" + block, flush=True)
                sections.append(block)
    summary = ["### Both layouts side by side", "", *comparison(results, model, a.batch), ""]
    if (fit := crossover(results, a.batch)):
        summary += [fit, ""]
    print("\n" + "\n".join(summary), flush=True)
    out += summary + [s + "\n" for s in sections]
    out.append("The step's other collectives: the loss is read (and averaged over dp) every `train.log_every` steps, "
               "not every step, so it is not in these tables.")
    if a.results:
        write_section("Tensor-parallel communication per step", "\n".join(out), Path(a.results))
        print(f"\nwrote {a.results}")


if __name__ == "__main__":
    main()
