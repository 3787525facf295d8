"""Whose a checkpoint is: the run that saved it, and the job (launch) whose process saved it.

A run starts at step 0 with a new id and keeps it through every resume (``TrainState.run_id``).
A job is one ``torchrun`` invocation or one Slurm job: its restarts (torchrun ``--max-restarts``,
an elastic re-rendezvous, a Slurm requeue) are the same job, and resume the checkpoints it saved
whatever ``checkpoint.resume`` says. What identifies a job's attempts, and only them:

- torchrun: each worker's parent is its host's torchrun agent, alive across the restarts of that
  invocation and of no other. Its host, boot, pid and start time name it. (TORCHELASTIC_RUN_ID
  does not: it is the literal "none" without ``--rdzv-id``, and a fixed id such as
  ``launch/torchrun-hosts.sh``'s default names every later invocation too.)
- Slurm: SLURM_JOB_ID survives a requeue, which raises SLURM_RESTART_COUNT; a second run started in
  the same allocation keeps both, so only a checkpoint from a lower restart count is the job's.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

AGENT_ENV = "TORCHELASTIC_RUN_ID"
"""Set by torchrun in its workers' environment: the process's parent is a torchrun agent."""


def torchrun_agent() -> str | None:
    """``host:boot:pid:start`` of this worker's torchrun agent; None outside torchrun or without /proc."""
    if AGENT_ENV not in os.environ:
        return None
    ppid = os.getppid()
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        start = Path(f"/proc/{ppid}/stat").read_text().rsplit(")", 1)[1].split()[19]  # field 22: start time
    except (OSError, IndexError):
        return None
    return f"{socket.gethostname()}:{boot}:{ppid}:{start}"


def slurm_job() -> dict | None:
    """This process's Slurm job and how often it was requeued, or None outside Slurm."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    return {"job": job, "cluster": os.environ.get("SLURM_CLUSTER_NAME", ""),
            "restart": int(os.environ.get("SLURM_RESTART_COUNT") or 0)}


def launch_of(agents: list[str | None]) -> dict:
    """The job, from every rank's ``torchrun_agent()``: recorded in each checkpoint's meta.json."""
    return {"agents": sorted({a for a in agents if a}), "slurm": slurm_job()}


def same_job(saved: dict | None, now: dict) -> bool:
    """Whether a checkpoint saved under launch ``saved`` was saved by an earlier attempt of the job
    ``now``: a torchrun agent they share, or the same Slurm job before a requeue."""
    if not saved:
        return False
    if set(saved.get("agents") or ()) & set(now["agents"]):
        return True
    before, slurm = saved.get("slurm"), now["slurm"]
    return bool(before and slurm and (before["job"], before["cluster"]) == (slurm["job"], slurm["cluster"])
                and slurm["restart"] > before["restart"])


def run_of(meta: dict) -> str | None:
    """The run that saved a checkpoint; None for one saved before runs had ids."""
    return meta["train_state"].get("run_id")


def describe_runs(found: dict[Path, dict | None]) -> str:
    """``found`` (checkpoint -> its meta.json, None where it does not read) in a few words per run:
    'step-00000028 to step-00000030 (run 3f2a9c1e, MLflow run 9d...)'."""
    by_run: dict[str, list[Path]] = {}
    mlflow: dict[str, str] = {}
    for folder, meta in found.items():
        key = "unknown run" if meta is None else f"run {run_of(meta)[:8]}" if run_of(meta) else "a run from before run ids"
        by_run.setdefault(key, []).append(folder)
        if meta is not None and meta["train_state"].get("mlflow_run_id"):
            mlflow[key] = meta["train_state"]["mlflow_run_id"]
    parts = []
    for key, folders in by_run.items():
        names = [f.name for f in folders]  # oldest first, as found
        span = names[0] if len(names) == 1 else f"{names[0]} to {names[-1]}"
        parts.append(f"{span} ({key}" + (f", MLflow run {mlflow[key]}" if key in mlflow else "") + ")")
    return "; ".join(parts)
