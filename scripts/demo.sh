#!/usr/bin/env bash
# `make demo`: the two-stage job on real data that installs offline, on whatever machine this is.
#   1. Fashion-MNIST (Debian's dataset-fashion-mnist) -> WebDataset shards (skipped when complete).
#   2. Stage 1: PVT-Tiny pretraining, 2 ranks, DeepSpeed ZeRO-2, bf16; prints top-1 and wall time.
#   3. Export the ZeRO checkpoint to one fp32 weights file.
#   4. Stage 2: Deformable-DETR fine-tuning of that backbone on real aerial photos (NEON tree crowns, from the
#      deepforest wheel): trained on one site's tiles, COCO AP on held-out tiles from a site 13 km away.
#   5. Detections drawn on a held-out tile, with its ground truth, counted against it.
# A second `make demo` resumes/reuses what is already in runs/ (delete runs/demo_* to start over).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/build/torch_extensions}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
NPROC="${NPROC:-2}"
PRETRAIN_RUN=runs/demo_fashion_mnist
DETR_RUN=runs/demo_deformable_tree_crowns
CROWNS=data/tree_crowns
HELD_OUT_TILE=$CROWNS/val/2019_YELL_2_541000_4977000_image_crop_0283_0318.jpg

echo "== model family (params / GMACs at 224) =="
$PY -m pvt_dist.models.summary --size 224 --models pvt_tiny pvt_small pvt_v2_b0 pvt_v2_b2

echo "== 1. Fashion-MNIST -> WebDataset shards =="
$PY -m pvt_dist.data.make_shards fashion-mnist --out data/fashion_mnist --workers 2

echo "== 2. stage 1: PVT-Tiny pretraining, $NPROC ranks, ZeRO-2, bf16 =="
.venv/bin/deepspeed --num_gpus "$NPROC" launch/train.py \
    --config configs/pretrain/demo_fashion_mnist.yaml run_dir="$PRETRAIN_RUN"

echo "== 3. export to fp32 weights =="
$PY -m pvt_dist.export "$PRETRAIN_RUN" "$PRETRAIN_RUN/pvt_tiny_fp32.pth"

echo "== 4. stage 2: Deformable-DETR fine-tuning on NEON tree crowns (40 training tiles; 12 held out) =="
$PY -m pvt_dist.detection.fetch_tree_crowns "$CROWNS"
# One process: the detection step is small, so its two threads do as well as two ranks here.
OMP_NUM_THREADS="$NPROC" $PY launch/finetune_detr.py --config configs/detr/demo_tree_crowns.yaml \
    run_dir="$DETR_RUN" model.backbone.pretrained="$PRETRAIN_RUN/pvt_tiny_fp32.pth"
OMP_NUM_THREADS="$NPROC" $PY launch/evaluate_detr.py --weights "$DETR_RUN/detector.pth" \
    --ann "$CROWNS/val/annotations.json" --images "$CROWNS/val" --batch 4

echo "== 5. detections drawn on a held-out tile (ground truth in white) =="
$PY launch/detect.py --weights "$DETR_RUN/detector.pth" "$HELD_OUT_TILE" --ann "$CROWNS/val/annotations.json" \
    --threshold "${DETECT_THRESHOLD:-0.3}" --out "$DETR_RUN/detections.png"
echo "wrote $DETR_RUN/detections.png"
echo "tensorboard --logdir runs"
