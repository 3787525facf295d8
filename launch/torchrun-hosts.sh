#!/usr/bin/env bash
# One host's part of a multi-host job: run this on every host (same command, same RDZV_HOST), and
# the torchrun agents meet at a c10d rendezvous on RDZV_HOST.
#
#   RDZV_HOST=node01 NODES=1:4 bash launch/torchrun-hosts.sh configs/alexnet-paper.yaml --set train.epochs=90
#
# Elastic by default (NODES=MIN:MAX, MAX_RESTARTS=3): a lost host (its process, the machine or its
# link) ends its peers' training processes within parallel.peer_timeout_s, the surviving agents
# re-form a smaller world and training resumes from the latest complete checkpoint at the new dp,
# in the same MLflow run; a host started later is taken in at the next re-rendezvous (the running
# ones save a checkpoint and resume with it). RDZV_HOST itself holds the rendezvous store and cannot
# be lost: the others then end within the same bound, saying so. docs/training.md ("Faults at
# scale") has what each fault costs, as measured by tests/test_faults.py with this script.
#
# Environment (all optional but RDZV_HOST):
#   RDZV_HOST        the host holding the rendezvous store (a name or address every host can reach)
#   RDZV_PORT        its port (default 29400)
#   NODES            MIN:MAX hosts (default 1:64), or N for a fixed size (a lost host then ends all)
#   NPROC_PER_NODE   training processes per host (default: the GPUs nvidia-smi lists, else 1)
#   MAX_RESTARTS     torchrun restarts after failures (default 3); membership changes are free
#   JOB_ID           names the rendezvous (default distalex): two jobs on one RDZV_HOST need two
#   LOCAL_ADDR       this host's address as the others reach it (default: torchrun's choice, the FQDN)
#   RDZV_CONF        more --rdzv-conf settings, e.g. last_call_timeout=10 (how long a re-rendezvous
#                    waits for more hosts once it has MIN; torchrun's default 30 s)
#   TRAIN_SCRIPT     a Python script to run instead of -m distalex.train (one that calls distalex.train.main)
#   PYTHON           the interpreter with distalex installed (default python3)
#   checkpoint.dir must be one directory every host mounts at the same path (checked at start).
set -euo pipefail
[[ -n ${RDZV_HOST:-} ]] || { echo "error: set RDZV_HOST to the host holding the rendezvous (the same on every host)" >&2; exit 2; }
(($#)) || { echo "usage: RDZV_HOST=HOST [NODES=MIN:MAX] bash $0 CONFIG.yaml [--set key=value ...]" >&2; exit 2; }
PYTHON=${PYTHON:-python3}
CONFIG=$1
shift
if [[ -z ${NPROC_PER_NODE:-} ]]; then
    NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    ((NPROC_PER_NODE > 0)) || NPROC_PER_NODE=1
fi
# torch 2.14's shared agent store (its default) cannot take in a host that joins a running job: the
# new host's agent waits for the round's store address, which node 0's agent writes only in its
# first round, and the round fails after 60 s. Without it every round writes the address.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
export PYTHONUNBUFFERED=1
agent=(--nnodes="${NODES:-1:64}" --nproc_per_node="$NPROC_PER_NODE" --max-restarts="${MAX_RESTARTS:-3}"
       --rdzv-backend=c10d --rdzv-endpoint="$RDZV_HOST:${RDZV_PORT:-29400}" --rdzv-id="${JOB_ID:-distalex}")
[[ -n ${LOCAL_ADDR:-} ]] && agent+=(--local-addr="$LOCAL_ADDR")
[[ -n ${RDZV_CONF:-} ]] && agent+=(--rdzv-conf "$RDZV_CONF")
if [[ -n ${TRAIN_SCRIPT:-} ]]; then entry=("$TRAIN_SCRIPT"); else entry=(-m distalex.train); fi
# checkpoint.resume=auto first: a restarted or re-formed world continues from the latest checkpoint.
exec "$PYTHON" -m torch.distributed.run "${agent[@]}" "${entry[@]}" --config "$CONFIG" --set checkpoint.resume=auto "$@"
