"""Training-step images/s of distalex's AlexNet and torchvision's, on whatever device is present.

    python bench/bench.py                       # full size: width 1, 224 px, batch 128
    python bench/bench.py --tiny                # CI smoke: width 1/16, 64 px, batch 8, < 60 s on a CPU
    python bench/bench.py --only distalex/eager --batch 32 --json out.json

One process, one row per setting, each a full training step (forward, cross-entropy, backward,
SGD with momentum and weight decay) on a fixed random batch already on the device:

- distalex's model (tp=1, towers=2: the paper's net in one process) and torchvision's ``alexnet``
  side by side (below width 1, torchvision's modules with every width scaled alike); eager and
  ``torch.compile``'d;
- on CUDA: float32 and bf16 autocast, each in NCHW and channels_last; on the CPU: float32, eager
  and compiled in NCHW, eager in channels_last;
- distalex with ``model.lrn=False``, to show what LRN costs (on the CPU in both memory formats);
- the tp=2 step on 2 processes (2 GPUs with nccl; with no GPU, 2 gloo CPU ranks with 1 thread each,
  against the tp=1 rows' ``--threads``), global batch unchanged, in each ``parallel.layout``
  (``distalex-tp2``: towers; ``distalex-tp2-hybrid``: hybrid);
- the input pipeline (bench/data.py's functions): JPEG decode + crop + flip in one process, and the
  whole ``TrainLoader`` through shards with ``--data-workers`` workers.

Timing: ``--warmup`` steps (compilation happens there, and is reported as ``first_step_s``), then
``--windows`` windows of ``--iters`` steps, each closed by ``torch.cuda.synchronize()`` on CUDA;
images/s is the median over the windows (all windows are in the JSON). Peak memory: on CUDA
``torch.cuda.max_memory_allocated`` (reset per row); on the CPU the process's peak RSS (VmHWM,
reset per row through /proc/self/clear_refs; else ru_maxrss since start), which includes the
Python and torch runtime (~0.3-0.5 GB) as well as the model.

Host allocator (``--malloc``): by default glibc keeps freed memory (``distalex.allocator``, as
``distalex.train`` runs on the CPU), so that the rows are not dominated by page faults of the
large tensors every step maps afresh; ``--malloc system`` keeps glibc's defaults. Either way every
row of a run has the same one.

Benchmarks print numbers; nothing here gates on timing. Exit status 1 only if a row that should
run fails (an error, not a slow number).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from results import provenance  # noqa: E402

CLASSES = 1000
FULL = dict(width=1.0, size=224, batch=128, warmup=3, iters=5, windows=5, data_images=400, compile_backend="inductor")
TINY = dict(width=1 / 16, size=64, batch=8, warmup=1, iters=2, windows=3, data_images=24, compile_backend="aot_eager")


# ------------------------------------------------------------------ memory


def _vm_hwm_bytes() -> int | None:
    try:
        m = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def reset_peak(device: torch.device) -> str:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return "cuda_max_memory_allocated"
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (and ru_maxrss) to the current RSS
        return "peak_rss_since_row_start"
    except OSError:
        return "ru_maxrss_since_process_start"


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    hwm = _vm_hwm_bytes()
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ------------------------------------------------------------------ timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(step, warmup: int, device: torch.device) -> float:
    """``warmup`` steps (compilation happens in the first); returns the first step's seconds."""
    t0 = time.perf_counter()
    step()
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        step()
    sync(device)
    return first


def time_window(step, images_per_step: int, iters: int, device: torch.device) -> tuple[float, float]:
    """(images/s, images per CPU-second of this process) over ``iters`` steps."""
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(iters):
        step()
    sync(device)
    return images_per_step * iters / (time.perf_counter() - t0), images_per_step * iters / max(time.process_time() - c0, 1e-9)


def summarize(rates: list[float], cpu_rates: list[float], images_per_step: int, first: float) -> dict:
    """images/s = median over the windows; images per CPU-second of this process (all its threads),
    median over the windows too: on a CPU shared with other jobs it moves less than the wall-clock
    rate. The best window's CPU rate as well: other jobs only ever slow a window down."""
    med = statistics.median(rates)
    return {"images_per_s": med, "step_ms": 1e3 * images_per_step / med, "window_images_per_s": rates,
            "images_per_cpu_s": statistics.median(cpu_rates), "images_per_cpu_s_best": max(cpu_rates),
            "window_images_per_cpu_s": cpu_rates, "first_step_s": first}


def measure(step, images_per_step: int, warmup: int, iters: int, windows: int, device: torch.device) -> dict:
    """Warm-up, then ``windows`` timed windows of ``iters`` steps."""
    first = warm_up(step, warmup, device)
    rates, cpu_rates = zip(*(time_window(step, images_per_step, iters, device) for _ in range(windows)))
    return summarize(list(rates), list(cpu_rates), images_per_step, first)


def set_malloc(mode: str) -> bool:
    """``--malloc``: the host allocator every row of this process runs with (whether it applied)."""
    from distalex.allocator import keep_freed_memory

    return keep_freed_memory() if mode == "keep" else False


def make_model(kind: str, width: float, size: int, lrn: bool = True):
    if kind == "distalex":
        from distalex.model import AlexNet

        return AlexNet(num_classes=CLASSES, towers=2, width=width, image_size=size, lrn=lrn)
    if kind == "torchvision":
        return torchvision_alexnet(width)
    raise ValueError(kind)


def torchvision_alexnet(width: float = 1.0):
    """torchvision's ``alexnet`` (one tower, 64/192/384/256/256, no LRN, 4096-wide fc); below width 1
    the same modules with every channel and fc width times ``width`` (torchvision has no such knob)."""
    from torch import nn
    from torchvision.models import alexnet

    model = alexnet(num_classes=CLASSES)
    if width == 1.0:
        return model
    ch = lambda c: max(1, round(c * width))  # noqa: E731
    prev = 3
    for i, m in enumerate(model.features):
        if isinstance(m, nn.Conv2d):
            model.features[i] = nn.Conv2d(prev, ch(m.out_channels), m.kernel_size, m.stride, m.padding)
            prev = ch(m.out_channels)
    linears = [i for i, m in enumerate(model.classifier) if isinstance(m, nn.Linear)]
    fan_in = prev * 6 * 6  # after torchvision's AdaptiveAvgPool2d((6, 6))
    for i in linears:
        out = CLASSES if i == linears[-1] else ch(model.classifier[i].out_features)
        model.classifier[i] = nn.Linear(fan_in, out)
        fan_in = out
    return model


def train_step_fn(model, x, y, autocast_dtype, device):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def step():
        if autocast_dtype is not None:
            with torch.autocast(device_type=device.type, dtype=autocast_dtype):
                loss = F.cross_entropy(model(x), y)
        else:
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def batch_on(device, batch: int, size: int, channels_last: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, CLASSES, (batch,), generator=g).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def prepare_single(row: dict, a, device: torch.device):
    """The training step of one tp=1 row, its model and batch built in this process."""
    torch.manual_seed(0)
    model = make_model(row["model"], a.width, a.size, lrn=row["lrn"]).to(device).train()
    if row["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    if row["compiled"]:
        model = torch.compile(model, backend=a.compile_backend, **({"mode": row["compile_mode"]} if row.get("compile_mode") else {}))
    x, y = batch_on(device, a.batch, a.size, row["channels_last"])
    return train_step_fn(model, x, y, torch.bfloat16 if row["dtype"] == "bf16" else None, device)


def run_single(row: dict, a, device: torch.device) -> dict:
    """One tp=1 row in this process, on its own."""
    from torch._dynamo.utils import counters

    mem_kind = reset_peak(device)
    skips = counters["inductor"]["cudagraph_skips"]
    out = measure(prepare_single(row, a, device), a.batch, a.warmup, a.iters, a.windows, device)
    if row.get("compile_mode") == "reduce-overhead":
        # graphs inductor compiled without CUDA graphs (the reason is in its log: "skipping cudagraphs due to ...")
        out["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"] - skips
    if device.type == "cpu" and a.malloc_applied:
        mem_kind += " (--malloc keep: freed memory stays in the process, so at least the earlier rows' peak)"
    out.update(peak_mem_bytes=peak_bytes(device), peak_mem_kind=mem_kind)
    return out


def run_interleaved(rows: list[dict], a, device: torch.device) -> None:
    """The tp=1 rows side by side: built and warmed up one after another, then their timed windows
    alternate (row 1, row 2, ..., row 1, ...), so that load from other processes lands on all of
    them alike. Fills each row's results and status. All models live at once, so a row's peak
    memory is not its own: it is left out."""
    steps, firsts = {}, {}
    for row in rows:
        try:
            steps[row["name"]] = prepare_single(row, a, device)
            firsts[row["name"]] = warm_up(steps[row["name"]], a.warmup, device)
        except Exception as e:  # noqa: BLE001 - reported in the row, the others still run
            steps.pop(row["name"], None)
            row["status"] = failure_status(row, e)
    samples = {name: ([], []) for name in steps}
    for _ in range(a.windows):
        for name, step in steps.items():
            rate, cpu_rate = time_window(step, a.batch, a.iters, device)
            samples[name][0].append(rate)
            samples[name][1].append(cpu_rate)
    for row in rows:
        if row["name"] in steps:
            row.update(summarize(*samples[row["name"]], a.batch, firsts[row["name"]]), status="ok",
                       peak_mem_bytes=None, peak_mem_kind="not measured (rows interleaved)")
    steps.clear()
    gc.collect()


# ------------------------------------------------------------------ tp=2


def tp_worker(device_type: str, width: float, size: int, batch: int, warmup: int, iters: int, windows: int,
              layout: str = "towers", malloc: str = "keep") -> dict:
    """tp=2 on 2 processes (spawned by tests/distributed.run_workers: 1 CPU thread each). Both ranks
    get the whole batch; under hybrid each convolves its half (the loader would scatter it)."""
    from distalex.model import AlexNet
    from distalex.parallel.dims import init_parallel
    from distalex.parallel.plan import parallelize

    set_malloc(malloc)
    dims = init_parallel(tp=2, towers=2, device=device_type, layout=layout)
    device = dims.device
    mem_kind = reset_peak(device)
    torch.manual_seed(0)
    model = parallelize(AlexNet(num_classes=CLASSES, towers=2, width=width, image_size=size), dims.tp_group, layout).to(device).train()
    x, y = batch_on(device, batch, size, channels_last=False)
    out = measure(train_step_fn(model, x, y, None, device), batch, warmup, iters, windows, device)
    out.update(peak_mem_bytes=peak_bytes(device), peak_mem_kind=mem_kind, rank=dims.rank)
    return out


def run_tp2(row: dict, a) -> dict:
    from tests.distributed import run_workers

    outs = run_workers(tp_worker, 2, row["device"], a.width, a.size, a.batch, a.warmup, a.iters, a.windows, row["layout"], a.malloc,
                       timeout=a.tp_timeout)
    # The ranks step in lockstep (every step has blocking collectives): report rank 0's rate and
    # the larger of the two peaks.
    out = dict(outs[0])
    out["peak_mem_bytes"] = max(o["peak_mem_bytes"] for o in outs)
    out["per_rank_images_per_s"] = [o["images_per_s"] for o in outs]
    # CPU-seconds of the job are both ranks': images per (sum of their CPU time)
    out["images_per_cpu_s"] = 1 / sum(1 / o["images_per_cpu_s"] for o in outs)
    out["images_per_cpu_s_best"] = 1 / sum(1 / o["images_per_cpu_s_best"] for o in outs)
    out.pop("rank", None)
    return out


# ------------------------------------------------------------------ input pipeline


def run_data(row: dict, a, jpegs_cache: dict) -> dict:
    import data  # bench/data.py

    if "jpegs" not in jpegs_cache:
        jpegs_cache["jpegs"] = data.imagenet_like(a.data_images)
    jpegs = jpegs_cache["jpegs"]
    mem_kind = reset_peak(torch.device("cpu"))
    resize, size = a.data_resize, a.data_size
    if row["name"].endswith("1proc"):
        data._crop_all((jpegs[: min(10, len(jpegs))], resize, size, 1))  # warm-up
        rates = []
        for w in range(a.windows):
            n, wall, cpu = data._crop_all((jpegs, resize, size, w))
            rates.append(n / wall)
        out = {"images_per_s": statistics.median(rates), "window_images_per_s": rates, "images_per_cpu_s": n / cpu}
    else:
        n, wall, cpu = data.bench_loader(jpegs, a.data_workers, resize, size, min(a.batch, 32))
        out = {"images_per_s": n / wall, "window_images_per_s": [n / wall], "images_per_cpu_s": n / cpu,
               "note": "one epoch, worker start-up included"}
    out.update(step_ms=None, first_step_s=None, peak_mem_bytes=peak_bytes(torch.device("cpu")), peak_mem_kind=mem_kind + " (main process)")
    return out


# ------------------------------------------------------------------ the rows


def plan_rows(device: torch.device, a) -> list[dict]:
    rows = []

    def add(model, compiled, dtype="fp32", channels_last=False, lrn=True, optional=False, cuda_graphs=False):
        label = model if lrn else f"{model}-nolrn"
        mode = "compiled-cudagraphs" if cuda_graphs else "compiled" if compiled else "eager"
        name = f"{label}/{mode}/{dtype}" + ("/channels_last" if channels_last else "")
        rows.append(dict(name=name, kind="step", model=model, compiled=compiled, dtype=dtype, channels_last=channels_last,
                         lrn=lrn, tp=1, optional=optional, compile_mode="reduce-overhead" if cuda_graphs else None))

    if device.type == "cuda":
        for model in ("distalex", "torchvision"):
            for compiled in (False, True):
                for dtype in ("fp32", "bf16"):
                    for cl in (False, True):
                        add(model, compiled, dtype, cl)
        for compiled in (False, True):
            add("distalex", compiled, "fp32", lrn=False)
            add("distalex", compiled, "bf16", True, lrn=False)
        # CUDA graphs (torch.compile's reduce-overhead mode) in the CUDA default setting: whether inductor
        # keeps them for a step with the dropout stream's CPU state in it (train.cuda_graphs is refused
        # because it does not: docs/training.md); cudagraph_skips in the row counts the graphs it skipped
        for model, lrn in (("distalex", True), ("torchvision", True), ("distalex", False)):
            add(model, True, "bf16", True, lrn=lrn, cuda_graphs=True)
    else:
        for model in ("distalex", "torchvision"):
            add(model, False)
            add(model, True)
            add(model, False, channels_last=True)
        add("distalex", False, lrn=False)
        add("distalex", True, lrn=False)
        add("distalex", False, channels_last=True, lrn=False)

    n_gpu = torch.cuda.device_count() if device.type == "cuda" else 0
    tp_device = {"auto": "cuda" if n_gpu >= 2 else ("cpu" if device.type == "cpu" else None)}.get(a.tp2, a.tp2)
    tp_row = dict(name="distalex-tp2/eager/fp32", kind="tp2", model="distalex", compiled=False, dtype="fp32",
                  channels_last=False, lrn=True, tp=2, device=tp_device, optional=False, layout="towers")
    if tp_device is None or tp_device == "off":
        tp_row["skip"] = "off" if tp_device == "off" else f"needs 2 GPUs, found {n_gpu} (--tp2 cpu runs it on 2 CPU ranks)"
    elif tp_device == "cuda" and n_gpu < 2:
        tp_row["skip"] = f"needs 2 GPUs, found {n_gpu}"
    rows.append(tp_row)
    rows.append(dict(tp_row, name="distalex-tp2-hybrid/eager/fp32", layout="hybrid"))
    for name in ("data/decode+crop+flip/1proc", f"data/TrainLoader/{a.data_workers}workers"):
        rows.append(dict(name=name, kind="data", model="-", compiled=False, dtype="uint8", channels_last=False, lrn=None,
                         tp=None, optional=False, **({"skip": "--no-data"} if a.no_data else {})))
    if a.rows:
        wanted = [s for s in a.rows.split(",") if s]
        unknown = sorted(set(wanted) - {r["name"] for r in rows})
        if unknown:
            raise SystemExit(f"--rows: no such row on {device.type}: {', '.join(unknown)}")
        rows = sorted((r for r in rows if r["name"] in wanted), key=lambda r: wanted.index(r["name"]))
    if a.only:
        keep = [s for s in a.only.split(",") if s]
        rows = [r for r in rows if any(k in r["name"] for k in keep)]
    return rows


def fmt_bytes(n) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f} MiB"


def print_table(rows: list[dict]) -> None:
    nan = float("nan")
    print(f"\n{'row':42s} {'images/s':>10s} {'windows min-max':>17s} {'img/CPU-s':>10s} {'step ms':>9s} {'1st step s':>10s} "
          f"{'peak mem':>11s}  status")
    for r in rows:
        w = r.get("window_images_per_s") or [nan]
        val = lambda k: nan if r.get(k) is None else r[k]  # noqa: E731
        print(f"{r['name']:42s} {val('images_per_s'):10.1f} {min(w):8.1f}-{max(w):<8.1f} {val('images_per_cpu_s'):10.1f} "
              f"{val('step_ms'):9.1f} {val('first_step_s'):10.2f} {fmt_bytes(r.get('peak_mem_bytes')):>11s}  {r['status']}")


def failure_status(row: dict, e: Exception) -> str:
    """A failed row's status: 'unsupported: ...' for an optional row, else 'error: ...' (exit status 1)."""
    msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    if row["optional"]:
        return "unsupported: " + msg
    traceback.print_exc()
    return "error: " + msg


def report_row(row: dict) -> None:
    row.pop("optional", None)
    print(f"  {row['name']:42s} {row.get('images_per_s', float('nan')):10.1f} images/s  "
          f"({row['row_wall_s']:.1f} s)  {row['status']}", flush=True)


def target_ratios(rows: list[dict]) -> list[dict]:
    """distalex against torchvision's alexnet and against its own no-LRN form, for every setting
    (compiled, dtype, memory format) that has both rows: in images/s, and in images per CPU-second."""
    ok = {r["name"]: r for r in rows if r.get("status") == "ok" and r["kind"] == "step"}
    out = []
    for name, r in ok.items():
        if r["model"] != "distalex" or not r["lrn"]:
            continue
        for other in (name.replace("distalex/", "torchvision/", 1), name.replace("distalex/", "distalex-nolrn/", 1)):
            if other in ok:
                o = ok[other]
                out.append({"row": name, "against": other, "images_per_s": r["images_per_s"] / o["images_per_s"],
                            "images_per_cpu_s": r["images_per_cpu_s"] / o["images_per_cpu_s"],
                            "images_per_cpu_s_best": r["images_per_cpu_s_best"] / o["images_per_cpu_s_best"]})
    return out


def print_ratios(ratios: list[dict]) -> None:
    if ratios:
        print(f"\n{'ratio':78s} {'images/s':>9s} {'img/CPU-s':>10s} {'best window':>12s}")
    for q in ratios:
        print(f"{q['row'] + ' / ' + q['against']:78s} {q['images_per_s']:8.2f}x {q['images_per_cpu_s']:9.2f}x "
              f"{q['images_per_cpu_s_best']:11.2f}x")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="width 1/16, 64 px, batch 8, few iterations (CI smoke)")
    p.add_argument("--width", type=float)
    p.add_argument("--size", type=int, help="input side (224 full)")
    p.add_argument("--batch", type=int, help="global batch per step (128 full)")
    p.add_argument("--warmup", type=int)
    p.add_argument("--iters", type=int, help="steps per timed window")
    p.add_argument("--windows", type=int, help="timed windows; images/s is their median")
    p.add_argument("--compile-backend", help="torch.compile backend (full: inductor; --tiny: aot_eager, which skips codegen)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in this process (default: torch's)")
    p.add_argument("--tp2", choices=("auto", "cpu", "cuda", "off"), default="auto",
                   help="auto: 2 GPUs if present, 2 CPU ranks without CUDA, skipped on 1 GPU")
    p.add_argument("--tp-timeout", type=float, default=900)
    p.add_argument("--data-images", type=int)
    p.add_argument("--data-workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--no-data", action="store_true", help="skip the input-pipeline rows")
    p.add_argument("--only", default="", help="comma-separated substrings: keep rows whose name contains one")
    p.add_argument("--rows", default="", help="comma-separated exact row names, run in this order")
    p.add_argument("--interleave", action="store_true",
                   help="time the tp=1 step rows round-robin, window by window (robust to other jobs' load; no peak memory)")
    p.add_argument("--malloc", choices=("keep", "system"), default="keep",
                   help="keep: glibc keeps freed memory, as distalex.train does on the CPU (distalex.allocator); "
                        "system: glibc's defaults (large blocks mmapped and unmapped, page faults every step)")
    p.add_argument("--json", default=None, help="default bench/results-<device>.json")
    a = p.parse_args(argv)
    for k, v in (TINY if a.tiny else FULL).items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    a.data_resize, a.data_size = (72, 64) if a.tiny else (256, 224)
    if a.threads:
        torch.set_num_threads(a.threads)
    a.malloc_applied = set_malloc(a.malloc)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prov = provenance(argv)
    config = {k: getattr(a, k) for k in ("tiny", "width", "size", "batch", "warmup", "iters", "windows", "interleave", "compile_backend",
                                          "data_images", "data_workers", "data_resize", "data_size")}
    config.update(device=str(device), torch_threads=torch.get_num_threads(), malloc=a.malloc, malloc_applied=a.malloc_applied)
    print(f"{prov['machine']}; torch {prov['torch']}; {prov['commit']}; load {prov['load_average_at_start']}")
    print("config: " + ", ".join(f"{k}={v}" for k, v in config.items()), flush=True)

    rows, jpegs = plan_rows(device, a), {}
    t_start = time.perf_counter()
    path = Path(a.json) if a.json else Path(__file__).resolve().parent / f"results-{device.type}.json"

    def write_json() -> None:
        """After every row: a run cut short (a time limit) still leaves the rows it finished."""
        path.write_text(json.dumps({"provenance": prov, "config": config, "rows": rows, "ratios": target_ratios(rows),
                                    "total_wall_s": time.perf_counter() - t_start}, indent=1, default=str))

    if a.interleave:
        t0 = time.perf_counter()
        together = [r for r in rows if r["kind"] == "step" and "skip" not in r]
        run_interleaved(together, a, device)
        for row in together:
            row["row_wall_s"] = (time.perf_counter() - t0) / len(together)
            report_row(row)
        write_json()
    for row in rows:
        if "status" in row:
            continue
        t0 = time.perf_counter()
        if "skip" in row:
            row["status"] = "skipped: " + row.pop("skip")
        else:
            try:
                if row["kind"] == "step":
                    row.update(run_single(row, a, device))
                elif row["kind"] == "tp2":
                    row.update(run_tp2(row, a))
                else:
                    row.update(run_data(row, a, jpegs))
                row["status"] = "ok"
            except Exception as e:  # noqa: BLE001 - a row's failure is reported, the others still run
                row["status"] = failure_status(row, e)
        row["row_wall_s"] = time.perf_counter() - t0
        report_row(row)
        write_json()
    print_table(rows)
    print_ratios(target_ratios(rows))
    write_json()
    print(f"\nwrote {path} ({time.perf_counter() - t_start:.0f} s)")
    return 1 if any(r["status"].startswith("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
