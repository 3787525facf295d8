#!/usr/bin/env bash
# The main job end to end on CPU: bundled dataset -> shards -> torchrun (2 ranks, tp=2) training
# -> 10-crop evaluation of the exported model -> predict on two images -> report pictures; the run
# and its final model are tracked in MLflow
# (sqlite store runs/mlflow.db unless MLFLOW_TRACKING_URI points at a server).
#
#   bash launch/demo.sh [--set key=value ...]     (extra overrides go to distalex.train)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DATA=data/demo
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # two ranks share the CPU cores

if [ ! -f "$DATA/shards/_info.json" ]; then
  echo "== bundled dataset -> $DATA/src -> $DATA/shards"
  rm -rf "$DATA/src"
  $PYTHON -m distalex.data.demo "$DATA/src"
  $PYTHON -m distalex.data.make_shards "$DATA/src" "$DATA/shards" --max-count 300 --overwrite
fi

# A fresh run every time: with a previous run's checkpoints still in runs/demo/checkpoints,
# checkpoint.resume=none refuses to start a new run beside them (the report would draw the old one).
rm -rf runs/demo

echo "== training: torchrun --nproc_per_node=2 -m distalex.train --config configs/demo.yaml $*"
# --standalone: a free rendezvous port on this machine (plain torchrun wants port 29500 free)
$PYTHON -m torch.distributed.run --standalone --nproc_per_node=2 --max-restarts=0 \
  -m distalex.train --config configs/demo.yaml --set checkpoint.resume=none "$@"

echo "== evaluation of the exported serial model (tp=1), 10 crops"
# The model file names the validation shards the run read (absolute paths) and carries the
# training statistics: nothing else is needed, from any directory.
$PYTHON -m distalex.evaluate runs/demo/model.pt --ten-crop

echo "== predict: the top 3 classes of two held-out images"
$PYTHON -m distalex.predict runs/demo/model.pt --top 3 \
  "$DATA"/src/val/n00000003/n00000003_val_00000.JPEG "$DATA"/src/val/n00000007/n00000007_val_00000.JPEG

echo "== report: conv1 kernels per tower, learning curves, 10-crop examples (also logged to the MLflow run)"
$PYTHON -m distalex.report runs/demo/checkpoints --out runs/demo/report

cat <<EOM

Done.
  run directory : runs/demo   (config.yaml, model.pt, kernels/, report/)
  checkpoints   : runs/demo/checkpoints
  MLflow        : ${MLFLOW_TRACKING_URI:-sqlite:///runs/mlflow.db}
                  view with: mlflow ui --backend-store-uri ${MLFLOW_TRACKING_URI:-sqlite:///runs/mlflow.db}
                  the run's model: runs:/<run_id>/model (see docs/using-a-model.md)
EOM
