#!/bin/bash
# One node's share of a SLURM job (run by srun, one task per node): check that the node's
# GPUs are usable, then start torchrun with this node's rank.  Settings come from env.sh.
#
#   srun "${SRUN_ARGS[@]}" launchers/slurm/node.sh launchers/search.py ARGS
set -euo pipefail

# A node with GPUs whose torch cannot use them would train on CPU over gloo without a word.
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
if [[ $gpus == 0 && -n ${CUDA_VISIBLE_DEVICES:-} && ${CUDA_VISIBLE_DEVICES} != NoDevFiles ]]; then
  gpus=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c '^[^-]' || true)  # -1 hides every GPU
fi
if ((gpus > 0)) && ! "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  echo "error: node $(hostname) has $gpus GPU(s) but the torch of $PYTHON cannot use CUDA: install a CUDA build" \
       "of torch there (make setup on a GPU node), or submit without GPUs to run on CPU (docs/cluster.md)" >&2
  exit 2
fi

exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" \
  --node_rank "$SLURM_NODEID" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  "$1" --dist_timeout "$DIST_TIMEOUT" "${@:2}"
