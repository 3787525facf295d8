"""The names of the metrics the training loop logs (and the report reads back)."""

METRIC_LOSS = "train/loss"
"""Training loss, mean over the last ``train.log_every`` steps and over the dp groups."""
METRIC_LR = "train/lr"
METRIC_IMAGES_PER_S = "train/images_per_s"
"""Global training throughput over the last logging window."""
METRIC_SKIPPED = "train/skipped_samples"
"""Samples the loader dropped (unreadable images) so far."""
METRIC_EPOCH_LOSS = "train/epoch_loss"
METRIC_TOP1 = "val/top1_error"
METRIC_TOP5 = "val/top5_error"
METRIC_VAL_LOSS = "val/loss"
METRIC_EPOCH = "epoch"
"""Epochs completed, logged at the step where validation ran (maps steps to epochs in plots)."""
METRIC_STEPS_SKIPPED = "train/epoch_steps_skipped"
"""Steps of an epoch left out because a resumed job changed how an epoch's samples are split (dp,
data.workers, ...): the epoch ended at the checkpoint's step. Logged at that step, on resume only."""

METRIC_DATA_WAIT = "perf/data_wait_percent"
"""Of the last logging window, the share of its time that the rank waiting most spent waiting for
its batches (distalex/steptime.py): the GPUs wait for the CPUs when it is well above 0."""
METRIC_COMPUTE_MS = "perf/compute_ms"
"""The median rank's own forward and backward per step (before the gradient exchange), in ms."""


def host_metric(host: str, name: str) -> str:
    """``perf/<host>/<name>``: one host's data wait or compute, logged at each epoch's end. ``host``
    is ``where_am_i``'s "node N name" (torchrun's node rank and the host name)."""
    return f"perf/{host.replace(' ', '-')}/{name}"


STEP_METRICS = (METRIC_LOSS, METRIC_LR, METRIC_IMAGES_PER_S, METRIC_SKIPPED, METRIC_DATA_WAIT, METRIC_COMPUTE_MS)
EPOCH_METRICS = (METRIC_EPOCH_LOSS, METRIC_TOP1, METRIC_TOP5, METRIC_VAL_LOSS, METRIC_EPOCH)
