"""``python -m distalex.train`` with its steps paced for fault tests (run as a script by torchrun).

PACE_STEP_S=s     every training step takes at least s seconds longer (time for a fault to land mid-run)
SLOW_STEP=R:K:S   on rank R, training step K (1-based, counted in this process) sleeps S seconds
WEDGE=R:K         on rank R, training step K never ends: the main thread blocks for good while the
                  process and its threads live (a deadlock, a read that never returns)
SLOW_SAVE_S=s     every checkpoint write takes s seconds longer

Only ``distalex.train.normalize`` (called once per training step) and the checkpoint manager's
``save`` are wrapped: the code under test carries no hook for this.
"""

import os
import threading
import time

import distalex.train as train
from distalex.checkpoint import CheckpointManager

pace = float(os.environ.get("PACE_STEP_S", "0"))
slow_rank, slow_step, slow_s = (os.environ.get("SLOW_STEP") or "-1:0:0").split(":")
wedge_rank, wedge_step = (os.environ.get("WEDGE") or "-1:0").split(":")
slow_save_s = float(os.environ.get("SLOW_SAVE_S", "0"))
real_normalize, real_save, steps = train.normalize, CheckpointManager.save, [0]


def normalize(*args, **kwargs):
    steps[0] += 1
    time.sleep(pace)
    rank = os.environ.get("RANK", "0")
    if rank == slow_rank and steps[0] == int(slow_step):
        print(f"paced_train: rank {slow_rank} sleeps {slow_s} s in step {slow_step}", flush=True)
        time.sleep(float(slow_s))
    if rank == wedge_rank and steps[0] == int(wedge_step):
        print(f"paced_train: rank {wedge_rank} wedged in step {wedge_step} at {time.time():.3f}", flush=True)
        threading.Event().wait()
    return real_normalize(*args, **kwargs)


def save(*args, **kwargs):
    time.sleep(slow_save_s)
    return real_save(*args, **kwargs)


train.normalize = normalize
CheckpointManager.save = save
if __name__ == "__main__":  # the loader's fork server imports this script too (as multiprocessing's spawn would)
    train.main()
