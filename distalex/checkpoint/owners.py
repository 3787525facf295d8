"""Whose a checkpoint is (the run that saved it, the job whose processes saved it), and so what a
start may resume (``plan_resume``).

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
from dataclasses import dataclass, field
from pathlib import Path

from distalex.checkpoint.folders import CheckpointError, complete_checkpoints, read_meta, resolve_checkpoint, set_aside

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


@dataclass
class ResumePlan:
    """Where a start resumes from: rank 0's decision, the same on every rank."""

    candidates: list[Path]
    """Newest first."""
    fall_back: bool
    """A candidate with a fault found in it is moved aside and the next one tried (else: an error)."""
    notes: list[str] = field(default_factory=list)
    """Lines for the log: checkpoints this start will not resume, or why it resumes the ones it does."""


def _meta_or_none(folder: Path) -> dict | None:
    """A listed checkpoint's meta.json, or None where it does not parse (or is gone). An I/O error
    reading it is raised (CheckpointReadError): it says nothing about the checkpoint."""
    try:
        return read_meta(folder)
    except CheckpointError:
        return None


def plan_resume(root: Path, resume: str, launch: dict) -> ResumePlan:
    """Where a start resumes from, as this process sees ``root`` (rank 0's decision;
    ``CheckpointManager.plan_resume`` states the rules and shares it with every rank)."""
    found = {folder: _meta_or_none(folder) for folder in complete_checkpoints(root)}
    aside = set_aside(root)
    notes = []
    if aside:
        notes.append(f"note: {root} holds {len(aside)} checkpoint(s) moved aside for a fault found in them "
                     f"({', '.join(p.name for p in aside)}): not resumed, kept for a look; delete them when done")
    own = [folder for folder, meta in reversed(found.items()) if meta is not None and same_job(meta.get("launch"), launch)]
    if own and resume != "auto":
        notes.append(f"a restart of this job: it resumes the checkpoints it saved in {root} "
                     f"(checkpoint.resume={resume} was for its first start)")
        return ResumePlan(own, True, notes)
    if resume == "auto":
        runs = {run_of(meta) for meta in found.values() if meta is not None and run_of(meta)}
        if len(runs) > 1:
            raise CheckpointError(
                f"checkpoint.dir {root} holds checkpoints of {len(runs)} runs ({describe_runs(found)}): "
                "checkpoint.resume=auto cannot tell which to continue; resume one by path (checkpoint.resume=PATH) "
                "or move the others away")
        return ResumePlan(list(reversed(found)), True, notes)
    if resume == "none":
        if found:
            raise CheckpointError(
                f"checkpoint.dir {root} holds another run's checkpoints ({describe_runs(found)}); "
                "checkpoint.resume=none starts a new run, which would save beside them: continue that run with "
                "checkpoint.resume=auto, or give this one another run_name (or checkpoint.dir), or move them away")
        return ResumePlan([], False, notes)
    folder = resolve_checkpoint(resume)
    if folder.parent.resolve() != root.resolve():
        wanted = run_of(read_meta(folder))
        others = {f: meta for f, meta in found.items() if meta is None or wanted is None or run_of(meta) != wanted}
        if others:
            raise CheckpointError(
                f"checkpoint.dir {root} holds another run's checkpoints ({describe_runs(others)}); the run resumed "
                f"from {folder} would save beside them: give it another run_name (or checkpoint.dir), or move them away")
    return ResumePlan([folder], False, notes)
