"""Stage 2: DETR fine-tuning of a (stage-1 or authors') PVT backbone on a COCO-format dataset.

    deepspeed --num_gpus 8 launch/finetune_detr.py --config configs/detr/pvt_small_coco.yaml [key=value ...]
    torchrun --nproc_per_node 8 launch/finetune_detr.py --config ...   # or srun python ...
    python launch/finetune_detr.py --config configs/detr/labelme_overfit.yaml run_dir=runs/x
    python launch/finetune_detr.py --config configs/detr/pvt_small_coco.yaml --plan --world-size 16

Same engine as stage 1 (ZeRO, bf16/fp16, checkpoints, exact resume, preemption, TensorBoard). At the end the
detector is exported to ``<run_dir>/<export>`` for launch/detect.py and launch/evaluate_detr.py.
Exit codes: 0 done (or stopped for preemption, checkpoint saved), 2 bad configuration, 3 non-finite loss.
"""

from __future__ import annotations

import time

T_LAUNCH = time.time()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pvt_dist.entrypoint import Stage, fmt, lazy, run_stage  # noqa: E402


def finish(result: dict) -> None:
    """Name the exported detector and keep the scalar results next to the run."""
    if result.get("export"):
        print(f"detector: {result['export']}")
    scalars = {k: v for k, v in result.items() if isinstance(v, (int, float, str, bool, type(None)))}
    with open(os.path.join(result["run_dir"], "result.json"), "w") as f:
        json.dump(scalars, f)


STAGE = Stage(
    name="pvt_dist.detr",
    load=lazy("pvt_dist.detection.config:load_detr_config"),
    resolve=lazy("pvt_dist.detection.config:resolve_detr_config"),
    plan="detr",
    trainer=lazy("pvt_dist.detection.trainer:DetrTrainer"),
    report=lambda r: f"COCO AP {fmt(r['AP'], '.4f')} AP50 {fmt(r['AP50'], '.4f')}",
    finish=finish,
    override_example="optim.lr=2e-4 schedule.total_steps=100",
)


def main(argv: list[str] | None = None) -> int:
    return run_stage(STAGE, __doc__, argv, T_LAUNCH)


if __name__ == "__main__":
    sys.exit(main())
