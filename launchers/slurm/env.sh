# Launch settings of a multi-node job, derived from SLURM's variables; sourced by the
# *.sbatch files here (after the pattern of torchtitan's multinode_trainer.slurm).
# Every setting can be overridden from the environment: X=${X:-default}.
#
#   MASTER_ADDR     the job's first node (rank 0's host), from `scontrol show hostnames`
#   MASTER_PORT     a port derived from the job id, so two jobs on one node do not collide
#   NNODES          nodes in the job
#   NPROC_PER_NODE  ranks per node: the node's GPUs, else 1 (CPU nodes)
#   CPUS_PER_NODE   CPUs of each node's srun task (all of them: its ranks, data workers and
#                   CPU offload run under that one task)
#   PYTHON          the interpreter with the project installed
#   DIST_TIMEOUT    seconds a rank waits for its peers (--dist_timeout)
# Each srun task (one per node, launchers/slurm/node.sh) adds its node rank, SLURM_NODEID.

nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
export MASTER_ADDR=${MASTER_ADDR:-${nodes[0]}}
export MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
export NNODES=${NNODES:-${SLURM_JOB_NUM_NODES:-${#nodes[@]}}}
export NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
export CPUS_PER_NODE=${CPUS_PER_NODE:-${SLURM_CPUS_ON_NODE:-1}}
export PYTHON=${PYTHON:-.venv/bin/python}
export DIST_TIMEOUT=${DIST_TIMEOUT:-600}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# The srun step: one task per node with every CPU of the node, unbound (srun would pin the
# task, and so all of torchrun's ranks, to one CPU: since Slurm 22.05 it does not inherit
# sbatch's --cpus-per-task), and the node's GPUs named (what a step gets of the job's GPUs
# by default has changed between Slurm versions).  --kill-on-bad-exit: when one node's
# launcher fails, SLURM ends the others (a frozen rank would otherwise keep its node's
# launcher waiting).
SRUN_ARGS=(--nodes="$NNODES" --ntasks-per-node=1 --cpus-per-task="$CPUS_PER_NODE" --cpu-bind=none
           --kill-on-bad-exit=1 ${SLURM_GPUS_ON_NODE:+--gpus-per-node="$SLURM_GPUS_ON_NODE"})
