#!/bin/bash
# Fine-tune a DETR detector on a pretrained PVT backbone with DeepSpeed: one process per GPU on every node.
#
#   sbatch slurm/finetune_detr.sh                         # the defaults below: PVT-Small DETR on COCO, 1 x 8
#   CONFIG=configs/detr/pvt_small_coco.yaml OVERRIDES="model.backbone.pretrained=runs/pvt_small/export.pth" \
#       sbatch --nodes=2 slurm/finetune_detr.sh
#
# Each #SBATCH line is a default that the sbatch flag of the same name overrides; CONFIG and OVERRIDES
# (space-separated dotted key=value) come from the environment. Preemption and time limits are handled as
# in slurm/pretrain.sh: checkpoint at the next step boundary, requeue, resume from `latest`.
#
#SBATCH --job-name=pvt-detr
# Nodes; one task (process) per GPU on each: keep --ntasks-per-node equal to --gpus-per-node.
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
# CPU cores per process, for image decoding and augmentation.
#SBATCH --cpus-per-task=10
#SBATCH --time=48:00:00
# Preemption/time-limit grace: USR1 to this script 120 s before the end -> checkpoint + requeue.
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
# A requeued run (same job id) appends to the same log.
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

TRAIN_SCRIPT=launch/finetune_detr.py
CONFIG=${CONFIG:-configs/detr/pvt_small_coco.yaml}
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
