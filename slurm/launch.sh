#!/bin/bash
# One node's share of a multi-node run: builds and runs this node's `accelerate launch` line. slurm/train.slurm runs
# it once per node through srun; it also runs by hand on any cluster (set the variables below) or on one machine.
#
#   slurm/launch.sh RECIPE.yaml [--field value ...]
#
# Environment (defaults in brackets):
#   NNODES [SLURM_NNODES or 1]   NODE_RANK [SLURM_PROCID or 0]   GPUS_PER_NODE [8]   METHOD [sft: sft|grpo|dpo]
#   MASTER_ADDR [first host of SLURM_JOB_NODELIST, else 127.0.0.1]   MASTER_PORT [29500]
#   ACCELERATE_CONFIG [accelerate_configs/multi_node.yaml]   RDZV_BACKEND [c10d]
#   DRY_RUN=1: print the command (one shell-quoted line) instead of running it.
set -euo pipefail

RECIPE=${1:?usage: slurm/launch.sh RECIPE.yaml [--field value ...]}
shift
METHOD=${METHOD:-sft}
case "$METHOD" in sft|grpo|dpo) ;; *) echo "launch.sh: METHOD must be sft, grpo or dpo, got '$METHOD'" >&2; exit 2;; esac
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-accelerate_configs/multi_node.yaml}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-${SLURM_NNODES:-1}}
NODE_RANK=${NODE_RANK:-${SLURM_PROCID:-0}}
if [ -z "${MASTER_ADDR:-}" ]; then
  if [ -n "${SLURM_JOB_NODELIST:-}" ]; then
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  else
    MASTER_ADDR=127.0.0.1
  fi
fi
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_BACKEND=${RDZV_BACKEND:-c10d}
for f in "$ACCELERATE_CONFIG" "$RECIPE"; do
  [ -f "$f" ] || { echo "launch.sh: $f not found (run from the repository root)" >&2; exit 2; }
done

cmd=(accelerate launch
  --config_file "$ACCELERATE_CONFIG"
  --num_machines "$NNODES"
  --num_processes $((NNODES * GPUS_PER_NODE))
  --machine_rank "$NODE_RANK"
  --main_process_ip "$MASTER_ADDR"
  --main_process_port "$MASTER_PORT"
  --rdzv_backend "$RDZV_BACKEND"
  -m "emoreason.train.$METHOD" --config "$RECIPE" "$@")

if [ "${DRY_RUN:-0}" = 1 ]; then
  printf '%q ' "${cmd[@]}"
  echo
else
  exec "${cmd[@]}"
fi
