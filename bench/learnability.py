"""Does the paper's net leave the plateau at ln(classes)? The full-size net on 100 classes of real scans.

    python bench/learnability.py [--steps 500] [--json bench/learnability.json]
    python bench/learnability.py --tiny          # the test suite's smoke run: a narrow net, a few steps

The task: scikit-learn's handwritten digit scans (real images the dependency ships), drawn two side
by side on colour backgrounds, 100 classes (the numbers 00-99; ``distalex.data.demo --pairs``),
made into shards by ``make_shards`` (which measures the mean image). The net: the paper's, 2 towers
at width 1, LRN, dropout 0.5, trained as ``configs/alexnet-paper.yaml`` trains it (SGD lr 0.01,
momentum 0.9, weight decay 5e-4 with the authors' bias conventions, random crops, flips and PCA
lighting, the mean image subtracted) in one process, at batch 64 (the paper's 128 would double the
time), 1000 steps (10 epochs of the 6400 training images), 127 x 127 crops of 145 squares:
the smallest input at which every max pool still has overlapping windows on each side of its
output (pool5 gives 3 x 3, the paper 6 x 6; fc6 then has 2304 inputs, a quarter of the paper's).

For each input scale (raw: the paper's; standardized: distalex's other) and init (paper; caffe:
biases 0.1, fc6-7 std 0.005; kaiming) from the same seed and the same batches, it reports:

- the signal at init: how much the logits depend on the image (std across images / mean |logit|);
- the first 20 steps' mean loss (the overshoot of the first updates);
- the step at which the loss leaves the plateau: its mean over 20 steps falls below ln(100) by
  more than ``train.plateau_margin`` (``distalex.plateau``, the rule of the training warning);
- the validation top-1 / top-5 error (1000 images whose scans training never saw) every
  ``--eval-every`` steps and after the budget.

It measures steps and errors, not time; the wall time is reported for planning (about 45 minutes
for the six runs on 2 idle cores, a step taking about 0.5 s there; raw pixels with Kaiming's init
diverge within a few steps). ``--steps``, ``--scales`` and ``--inits`` run less. Results: docs/paper.md, "Does it learn?".
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from results import provenance  # noqa: E402  (bench/results.py)
from distalex.config import load_config  # noqa: E402
from distalex.data.augment import centre_crop, centre_square, hwc_to_chw, normalize  # noqa: E402
from distalex.data.demo import write_demo  # noqa: E402
from distalex.data.make_shards import make_shards  # noqa: E402
from distalex.engine.base import build_optimizer  # noqa: E402
from distalex.model import build_model  # noqa: E402
from distalex.plateau import chance_loss, left_plateau_at  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAPER_CONFIG = ROOT / "configs" / "alexnet-paper.yaml"
SCALES = ("raw", "standardized")
INITS = ("paper", "caffe", "kaiming")
WINDOW = 20
"""Steps averaged when deciding that the loss has left the plateau."""
FULL = dict(width=1.0, image_size=127, resize=145, draw_size=160, train_per_class=64, val_per_class=10, steps=1000,
            batch=64, eval_every=100)
TINY = dict(width=1 / 16, image_size=63, resize=72, draw_size=80, train_per_class=2, val_per_class=1, steps=4,
            batch=8, eval_every=2)


def make_data(root: Path, s: dict, seed: int) -> Path:
    """The 100-class pairs as JPEGs and shards (with the mean image); the shards' folder."""
    shards = root / "shards"
    if (shards / "_info.json").is_file():
        return shards
    write_demo(root / "src", s["train_per_class"], s["val_per_class"], size=s["draw_size"], seed=seed, pairs=True)
    make_shards(root / "src", shards, workers=1, stats_samples=100 * s["train_per_class"])
    return shards


def load_squares(src: Path, split: str, resize: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, resize, resize, 3) uint8 central squares and (N,) labels: what the loader's workers cut from."""
    images, labels = [], []
    for c, folder in enumerate(sorted((src / split).iterdir())):
        for path in sorted(folder.glob("*.JPEG")):
            images.append(centre_square(path.read_bytes(), resize))
            labels.append(c)
    return np.stack(images), np.asarray(labels)


def batches(squares: np.ndarray, labels: np.ndarray, size: int, batch: int, steps: int, seed: int):
    """``steps`` training batches (uint8 (B, 3, S, S), labels): epochs in a shuffled order, random
    crops and flips as the paper's (augment.crop_box's offsets, exact windows). The same for every run."""
    rng = np.random.default_rng(seed)
    order: list[int] = []
    span = squares.shape[1] - size + 1
    for _ in range(steps):
        while len(order) < batch:
            order += rng.permutation(len(squares)).tolist()
        idx, order = order[:batch], order[batch:]
        ox, oy, flip = rng.integers(0, span, batch), rng.integers(0, span, batch), rng.random(batch) < 0.5
        crops = [squares[i, y : y + size, x : x + size] for i, x, y in zip(idx, ox, oy)]
        crops = [c[:, ::-1] if f else c for c, f in zip(crops, flip)]
        yield torch.stack([hwc_to_chw(c) for c in crops]), torch.from_numpy(labels[idx])


@torch.no_grad()
def validate(model, val_x: torch.Tensor, val_y: torch.Tensor, data_cfg) -> tuple[float, float]:
    """(top-1, top-5) error of the centre crops, in eval mode."""
    model.eval()
    top1 = top5 = 0
    for i in range(0, len(val_x), 200):
        logits = model(normalize(val_x[i : i + 200], train=False, data_cfg=data_cfg))
        top = logits.topk(5, dim=1).indices
        hit = top == val_y[i : i + 200, None]
        top1 += int(hit[:, 0].sum())
        top5 += int(hit.any(1).sum())
    model.train()
    return 1 - top1 / len(val_x), 1 - top5 / len(val_x)


@torch.no_grad()
def signal_at_init(model, val_x: torch.Tensor, data_cfg) -> float:
    """How much the logits depend on the image: their std across images / their mean |value| (eval mode)."""
    model.eval()
    logits = model(normalize(val_x[:100], train=False, data_cfg=data_cfg)).double()
    model.train()
    return float(logits.std(0).mean() / logits.abs().mean())


def run_one(scale: str, init: str, s: dict, args, shards: Path, train, val) -> dict:
    cfg = load_config(PAPER_CONFIG, [
        "model.num_classes=100", f"model.width={s['width']}", f"model.image_size={s['image_size']}",
        f"model.init={init}", f"data.input_scale={scale}", f"data.train_shards={shards}", f"data.resize={s['resize']}",
        f"train.batch_size={s['batch']}",
    ])
    torch.manual_seed(args.seed)
    model = build_model(cfg.model).to(memory_format=torch.channels_last).train()
    model.reseed_dropout(args.seed)
    optimizer = build_optimizer(model, cfg)
    lighting = torch.Generator().manual_seed(args.seed)
    val_x, val_y = val
    result = {"scale": scale, "init": init, "signal_at_init": signal_at_init(model, val_x, cfg.data), "losses": [],
              "evals": [], "diverged_at": None}
    step_times = []
    t0 = time.perf_counter()
    for step, (images, labels) in enumerate(batches(*train, s["image_size"], cfg.train.batch_size, s["steps"], args.seed), 1):
        ts = time.perf_counter()
        x = normalize(images, train=True, data_cfg=cfg.data, generator=lighting).contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(model(x), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = loss.item()
        step_times.append(time.perf_counter() - ts)
        if not math.isfinite(value):
            result["diverged_at"] = step
            break
        result["losses"].append(value)
        if step % s["eval_every"] == 0 or step == s["steps"]:
            top1, top5 = validate(model, val_x, val_y, cfg.data)
            result["evals"].append({"step": step, "top1_error": top1, "top5_error": top5})
            print(f"  {scale}/{init} step {step}: loss {statistics.mean(result['losses'][-WINDOW:]):.4f} (last {WINDOW}), "
                  f"val top-1 error {100 * top1:.1f}%", flush=True)
    losses = result["losses"]
    result.update(
        left_plateau_at=left_plateau_at(losses, 100, cfg.train.plateau_margin, WINDOW),
        first_steps_loss=statistics.mean(losses[:WINDOW]) if losses else None,
        final_loss=statistics.mean(losses[-WINDOW:]) if losses else None,
        seconds=time.perf_counter() - t0, median_step_s=statistics.median(step_times),
        batch_size=cfg.train.batch_size, plateau_margin=cfg.train.plateau_margin,
        optim={k: getattr(cfg.optim, k) for k in ("lr", "momentum", "weight_decay", "bias_lr_mult", "bias_decay_mult")},
    )
    return result


def table(results: list[dict], steps: int) -> str:
    rows = ["| input scale | init | signal at init | loss, first 20 steps | leaves the plateau at step | "
            f"loss, last 20 steps | val top-1 / top-5 error after {steps} steps |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        last = r["evals"][-1] if r["evals"] else None
        err = f"{100 * last['top1_error']:.1f}% / {100 * last['top5_error']:.1f}%" if last else "-"
        left = r["left_plateau_at"] if r["left_plateau_at"] is not None else f"never (<= {len(r['losses'])})"
        if r["diverged_at"]:
            left, err = f"diverged at step {r['diverged_at']}", "-"
        fmt = lambda v: "-" if v is None or not v < 1e3 else f"{v:.3f}"  # noqa: E731  (diverged: no mean to show)
        rows.append(f"| {r['scale']} | {r['init']} | {r['signal_at_init']:.2e} | {fmt(r['first_steps_loss'])} | {left} | "
                    f"{fmt(r['final_loss'])} | {err} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python bench/learnability.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a narrow net, a few steps: a smoke run")
    p.add_argument("--steps", type=int, default=None, help=f"training steps per run (default {FULL['steps']})")
    p.add_argument("--batch", type=int, default=None, help=f"batch size (default {FULL['batch']}; the paper's is 128)")
    p.add_argument("--scales", default=",".join(SCALES))
    p.add_argument("--inits", default=",".join(INITS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", default=None, help="a folder to make (or reuse) the dataset in; default a temporary one")
    p.add_argument("--json", default=None, help="write the results here, after every run")
    p.add_argument("--table", nargs="+", metavar="JSON", help="only print the table of results saved by --json")
    args = p.parse_args(argv)
    if args.table:  # one table per budget, the runs of every file with that budget in it
        by_steps: dict[int, list] = {}
        for path in args.table:
            saved = json.loads(Path(path).read_text())
            by_steps.setdefault(saved["settings"]["steps"], []).extend(saved["runs"])
        print("\n\n".join(table(runs, steps) for steps, runs in by_steps.items()))
        return
    s = dict(TINY if args.tiny else FULL)
    s.update({k: v for k, v in (("steps", args.steps), ("batch", args.batch)) if v})
    torch.set_num_threads(args.threads)
    out = {"provenance": provenance(argv), "settings": {**s, "seed": args.seed, "threads": args.threads,
                                                        "chance_loss": chance_loss(100), "window": WINDOW}, "runs": []}
    with tempfile.TemporaryDirectory(prefix="learnability-") as tmp:
        root = Path(args.data) if args.data else Path(tmp)
        shards = make_data(root, s, args.seed)
        train = load_squares(root / "src", "train", s["resize"])
        val_sq, val_y = load_squares(root / "src", "val", s["resize"])
        val = (torch.stack([hwc_to_chw(centre_crop(v, s["image_size"])) for v in val_sq]), torch.from_numpy(val_y))
        print(f"{len(train[0])} training, {len(val_y)} validation images of 100 classes; {s['steps']} steps each", flush=True)
        for scale in args.scales.split(","):
            for init in args.inits.split(","):
                out["runs"].append(run_one(scale, init, s, args, shards, train, val))
                if args.json:
                    Path(args.json).write_text(json.dumps(out, indent=1))
    print(table(out["runs"], s["steps"]))


if __name__ == "__main__":
    main()
