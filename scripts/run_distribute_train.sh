#!/usr/bin/env bash
# Data-parallel training with msrun, MindSpore's launcher (see README, "Distributed training").
#
#   one machine, 2 processes:   bash scripts/run_distribute_train.sh 2 --data_path data/ml-1m --protocol paper
#   several machines (run on each, NODE_RANK 0..NODES-1; MASTER_ADDR = the address of node 0):
#       NODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash scripts/run_distribute_train.sh 16 --device_target GPU ...
#
# The first argument is the total number of worker processes (ranks); the others go to train.py.
# --batch_size is per rank: the global batch is batch_size x ranks, gradients are averaged, so use
# the learning rate of a single process trained with the global batch.
set -euo pipefail
if [ $# -lt 1 ] || ! [[ "$1" =~ ^[0-9]+$ ]]; then
  echo "usage: bash scripts/run_distribute_train.sh RANKS [train.py options...]" >&2
  exit 2
fi
ranks=$1; shift
nodes=${NODES:-1}
if (( ranks % nodes != 0 )); then
  echo "RANKS ($ranks) must be a multiple of NODES ($nodes)" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
log_dir=${LOG_DIR:-runs/msrun-logs-$(date +%Y%m%d-%H%M%S)}
exec msrun --worker_num="$ranks" --local_worker_num=$((ranks / nodes)) \
  --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-8118}" \
  --node_rank="${NODE_RANK:-0}" --log_dir="$log_dir" --join=True --cluster_time_out="${CLUSTER_TIME_OUT:-600}" \
  train.py --distribute "$@"
