"""``python -m distalex.train`` with its steps paced for fault tests (run as a script by torchrun).

PACE_STEP_S=s     every training step takes at least s seconds longer (time for a fault to land mid-run)
SLOW_STEP=R:K:S   on rank R, training step K (1-based, counted in this process) sleeps S seconds

Only ``distalex.train.normalize`` (called once per training step) is wrapped: the code under test
carries no hook for this.
"""

import os
import time

import distalex.train as train

pace = float(os.environ.get("PACE_STEP_S", "0"))
slow_rank, slow_step, slow_s = (os.environ.get("SLOW_STEP") or "-1:0:0").split(":")
real_normalize, steps = train.normalize, [0]


def normalize(*args, **kwargs):
    steps[0] += 1
    time.sleep(pace)
    if os.environ.get("RANK", "0") == slow_rank and steps[0] == int(slow_step):
        print(f"paced_train: rank {slow_rank} sleeps {slow_s} s in step {slow_step}", flush=True)
        time.sleep(float(slow_s))
    return real_normalize(*args, **kwargs)


train.normalize = normalize
if __name__ == "__main__":  # the loader's fork server imports this script too (as multiprocessing's spawn would)
    train.main()
