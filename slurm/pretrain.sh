#!/bin/bash
# Pretrain a Pyramid Vision Transformer with DeepSpeed: one process per GPU on every allocated node.
#
#   sbatch slurm/pretrain.sh                              # the defaults below: pvt_v2_b2, 2 x 8 GPUs
#   CONFIG=configs/pretrain/pvt_small.yaml OVERRIDES="run_dir=runs/pvt_small optim.lr=5e-4" \
#       sbatch --nodes=4 --time=12:00:00 slurm/pretrain.sh
#
# Each #SBATCH line is a default that the sbatch flag of the same name overrides; CONFIG and OVERRIDES
# (space-separated dotted key=value) come from the environment. On preemption or near the time limit the
# job checkpoints at the next step boundary and requeues itself (same job id, SLURM_RESTART_COUNT + 1);
# the requeued run resumes from the run dir's `latest` checkpoint. CPU-only nodes: --gpus-per-node=0 runs
# on CPU with gloo (then choose --ntasks-per-node yourself).
#
#SBATCH --job-name=pvt-pretrain
# Nodes; one task (process) per GPU on each: keep --ntasks-per-node equal to --gpus-per-node.
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
# CPU cores per process, for DALI decoding threads.
#SBATCH --cpus-per-task=10
#SBATCH --time=24:00:00
# Preemption/time-limit grace: USR1 to this script 120 s before the end -> checkpoint + requeue.
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
# A requeued run (same job id) appends to the same log.
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

TRAIN_SCRIPT=launch/train.py
CONFIG=${CONFIG:-configs/pretrain/pvt_v2_b2.yaml}
OVERRIDES=${OVERRIDES:-}
# sbatch runs a spool copy of this script: find the repository from the submit dir, or else from the path
# that was given to sbatch (scontrol knows it).
if [[ -z "${PVT_DIST_ROOT:-}" ]]; then
    if [[ -f "$SLURM_SUBMIT_DIR/slurm/srun_train.sh" ]]; then
        PVT_DIST_ROOT=$SLURM_SUBMIT_DIR
    else
        submitted=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')
        PVT_DIST_ROOT=$(cd "$(dirname "$submitted")/.." && pwd)
    fi
fi
source "$PVT_DIST_ROOT/slurm/srun_train.sh"
