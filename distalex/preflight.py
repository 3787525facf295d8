"""Checks a job's config before a cluster starts it, and fits the loader to the node's cores.

    python -m distalex.preflight --world 8 --cores 96 --procs 8 --gpus 8 --config FILE [--set k=v ...]

``launch/slurm/train.sbatch`` runs it before ``srun`` starts a torchrun per node: a bad config,
missing shards or a world size that ``parallel.tp`` does not divide fail here in seconds with exit
status 2 (torchrun would retry each ``--max-restarts`` times). It takes a few seconds (no process
group, no model); the training repeats every check.

Its one line on stdout is the number of loader workers that fit the node (``loader_workers``), which
the script passes as ``--set data.workers=N`` before the user's own overrides; what it found goes to
stderr (the job's log): the cores each loading rank has, and a warning where a GPU node's loader
would starve.
"""

from __future__ import annotations

import argparse
import sys

from distalex.config import add_config_args, config_from_args
from distalex.data.info import DataError, read_info, resolve_shards

EXIT_BAD_INPUT = 2


def loading_ranks_per_node(procs: int, tp: int) -> int:
    """Loading ranks (tp rank 0 of each tp group) on one node of ``procs`` processes: ranks are
    numbered node by node, and a group wider than a node has its loading rank on its first node."""
    return max(1, procs // tp)


def loader_workers(cores: int, procs: int, tp: int) -> tuple[int, int]:
    """(cores per loading rank, loader workers that fit them): each loading rank shares its group's
    cores with the group's training processes (on one node: min(tp, procs) of them), and gets at
    least one worker."""
    per_loading = cores // loading_ranks_per_node(procs, tp)
    return per_loading, max(1, per_loading - min(tp, procs))


def starves(per_loading: int, training_procs: int) -> bool:
    """Whether a GPU node's loading rank has too few cores to keep its GPUs fed: fewer than two
    workers beyond one core per training process. AlexNet's step is cheap on a GPU, so every image
    it takes must be decoded on the CPU at that pace (docs/benchmarks.md: a few hundred to a few
    thousand images per core-second)."""
    return per_loading < 2 * training_procs + 2


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m distalex.preflight", description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, required=True, help="nodes x processes per node")
    parser.add_argument("--cores", type=int, default=1, help="cores the allocation gives each node")
    parser.add_argument("--procs", type=int, default=1, help="training processes per node")
    parser.add_argument("--gpus", type=int, default=0, help="GPUs per node (0: a CPU job)")
    add_config_args(parser)
    args = parser.parse_args(argv)
    cfg = config_from_args(args)  # prints the error and exits 2
    tp = cfg.parallel.tp

    def fail(message) -> None:
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)

    try:  # data.info: where remote or foreign shards' _info.json is (beside local shards without it)
        read_info(cfg.data.train_shards, cfg.data.info)
        train = resolve_shards(cfg.data.train_shards, "train", "data.train_shards", cfg.data.info)
        resolve_shards(cfg.data.val_shards, "val", "data.val_shards", cfg.data.info)
    except DataError as e:
        fail(e)
    if args.world % tp:
        fail(f"world size {args.world} (nodes x processes per node) is not divisible by parallel.tp={tp}")
    print(f"preflight ok: run {cfg.run_name}, dp={args.world // tp} x tp={tp}, "
          f"{sum(s.count for s in train)} training images in {len(train)} shards", file=sys.stderr, flush=True)
    per_loading, workers = loader_workers(args.cores, args.procs, tp)
    print(f"cores: {args.cores} on each node for {args.procs} process(es), "
          f"{loading_ranks_per_node(args.procs, tp)} loading rank(s) per node (tp={tp}): {per_loading} core(s) per "
          f"loading rank -> data.workers={workers}", file=sys.stderr, flush=True)
    if args.gpus and starves(per_loading, min(tp, args.procs)):
        print(f"warning: {per_loading} core(s) per loading rank for {args.gpus} GPU(s) per node: the loader decodes "
              "every image on the CPU and will starve the GPUs; submit with --exclusive (every core of each node) "
              "or a larger --cpus-per-task", file=sys.stderr, flush=True)
    print(workers, flush=True)


if __name__ == "__main__":
    main()
