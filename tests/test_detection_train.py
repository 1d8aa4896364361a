"""DETR fine-tuning through the stage-1 DeepSpeed engine on the real labelme photos (CPU, bounded steps)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from detection_helpers import ROOT, labelme_example


def _run(args, cwd=ROOT, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_EXTENSIONS_DIR=str(ROOT / "build" / "torch_extensions"))
    proc = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _data_overrides(root):
    ann = root / "annotations.json"
    return [
        f"data.train_ann={ann}",
        f"data.train_images={root}",
        f"data.val_ann={ann}",
        f"data.val_images={root}",
    ]


def _step_losses(run_dir):
    lines = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {x["step"]: x["train/loss_step"] for x in lines if "train/loss_step" in x}


def _tool(module_path, argv, capsys):
    """Run a launch/ script's main() in this process (saves an interpreter start per call)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(Path(module_path).stem, ROOT / module_path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    result = mod.main(argv)
    return result, capsys.readouterr().out


def test_overfit_labelme_reaches_map_exports_and_resumes(tmp_path, capsys):
    root = labelme_example()
    run_dir = tmp_path / "run"
    cfg = ["launch/finetune_detr.py", "--config", "configs/detr/labelme_overfit.yaml", *_data_overrides(root)]
    out = _run(
        [
            *cfg,
            f"run_dir={run_dir}",
            "schedule.total_steps=60",
            "eval.every_steps=60",
            "checkpoint.every_steps=5",
            "checkpoint.keep_last=2",
        ]
    )
    result = json.loads((run_dir / "result.json").read_text())
    print(result)
    assert result["step"] == 60 and result["AP"] >= 0.5, out[-3000:]
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in out
    losses = _step_losses(run_dir)
    assert sum(losses[s] for s in range(51, 61)) < sum(losses[s] for s in range(1, 11)) / 2
    # Loss terms and COCO stats are in TensorBoard, with drawn validation images.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0}).Reload()
    tags = acc.Tags()
    assert {"train/loss_ce", "train/loss_bbox", "train/loss_giou", "val/AP", "val/AP50"} <= set(
        tags["scalars"]
    )
    assert "val/detections_0" in tags["images"]

    # The export drives the two user tools.
    export = run_dir / "detector.pth"
    image = root / "JPEGImages" / "2011_000025.jpg"
    out_png = tmp_path / "out.png"
    found, text = _tool(
        "launch/detect.py", ["--weights", str(export), str(image), "--out", str(out_png)], capsys
    )
    assert out_png.stat().st_size > 10000 and " detections >= 0.5" in text
    assert "bus" in {f["class"] for f in found}  # 2011_000025 shows two buses and a car
    stats, text = _tool(
        "launch/evaluate_detr.py",
        [
            "--weights",
            str(export),
            "--ann",
            str(root / "annotations.json"),
            "--images",
            str(root),
            "--batch",
            "3",
        ],
        capsys,
    )
    assert stats["AP"] == pytest.approx(result["AP"], abs=1e-6)
    assert len([ln for ln in text.splitlines() if ln.startswith(" Average")]) == 12

    # Resume from the step-55 checkpoint in a fresh run dir: steps 56..60 repeat the same losses exactly
    # (data position, augmentation RNG, weights and optimizer state all restored).
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(run_dir / "checkpoints" / "step_00000055", resumed / "checkpoints" / "step_00000055")
    (resumed / "checkpoints" / "latest").write_text("step_00000055")
    out = _run([*cfg, f"run_dir={resumed}", "schedule.total_steps=60", "eval.at_end=false"])
    assert "resumed from" in out
    again = _step_losses(resumed)
    assert sorted(again) == [56, 57, 58, 59, 60]
    for step in again:
        assert again[step] == pytest.approx(losses[step], rel=1e-6), (step, again, losses)


DEFORMABLE_TINY = [
    "model.head=deformable",
    "model.backbone.stages=[2,3,4]",
    "model.deformable.d_model=64",
    "model.deformable.nhead=4",
    "model.deformable.num_encoder_layers=1",
    "model.deformable.num_decoder_layers=2",
    "model.deformable.dim_feedforward=128",
    "model.deformable.dropout=0.0",
    "model.num_queries=16",
]


def test_deformable_head_trains_exports_and_resumes_exactly(tmp_path, capsys):
    """The Deformable-DETR head through the same engine: losses fall, COCO eval, export -> evaluate_detr.py
    and detect.py (sigmoid top-k post-processing), and an exact resume."""
    root = labelme_example()
    run_dir = tmp_path / "run"
    cfg = [
        "launch/finetune_detr.py",
        "--config",
        "configs/detr/labelme_overfit.yaml",
        *_data_overrides(root),
        *DEFORMABLE_TINY,
        "schedule.total_steps=16",
        "checkpoint.every_steps=4",
        "checkpoint.keep_last=2",  # steps 12 and 16: the resume below starts from 12
    ]
    out = _run([*cfg, f"run_dir={run_dir}", "eval.every_steps=16"])
    assert "Deformable-DETR pvt_v2_b0 stages [2, 3, 4]" in out
    result = json.loads((run_dir / "result.json").read_text())
    assert result["step"] == 16 and result["AP"] is not None, out[-3000:]
    losses = _step_losses(run_dir)
    assert sum(losses[s] for s in range(13, 17)) < sum(losses[s] for s in range(1, 5))
    export = run_dir / "detector.pth"
    stats, _ = _tool(
        "launch/evaluate_detr.py",
        [
            "--weights",
            str(export),
            "--ann",
            str(root / "annotations.json"),
            "--images",
            str(root),
            "--batch",
            "3",
        ],
        capsys,
    )
    assert stats["AP"] == pytest.approx(result["AP"], abs=1e-6)
    out_png = tmp_path / "out.png"
    _tool("launch/detect.py", ["--weights", str(export), str(root / "JPEGImages" / "2011_000025.jpg"),
                               "--out", str(out_png), "--threshold", "0.0"], capsys)  # fmt: skip
    assert out_png.stat().st_size > 10000

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(run_dir / "checkpoints" / "step_00000012", resumed / "checkpoints" / "step_00000012")
    (resumed / "checkpoints" / "latest").write_text("step_00000012")
    out = _run([*cfg, f"run_dir={resumed}", "eval.at_end=false"])
    assert "resumed from" in out
    again = _step_losses(resumed)
    assert sorted(again) == [13, 14, 15, 16]
    for step in again:
        assert again[step] == pytest.approx(losses[step], rel=1e-6), (step, again, losses)


@pytest.mark.slow
def test_two_ranks_zero2_bf16(tmp_path):
    """2 CPU ranks (gloo), ZeRO-2, bf16, end to end: the run trains, evaluates and exports, and its export
    scored on 2 ranks (each image on one rank, detections gathered) gives exactly the 1-process COCO stats.
    The mechanisms alone: test_train_shards_partition_every_epoch (sharding),
    test_num_boxes_all_reduced_across_ranks (box count), test_gather_across_ranks_each_image_once."""
    root = labelme_example()
    run_dir = tmp_path / "run"
    args = [
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "launch/finetune_detr.py",
        "--config",
        "configs/detr/labelme_overfit.yaml",
        f"run_dir={run_dir}",
        "schedule.total_steps=4",
        "eval.every_steps=4",
        "deepspeed.zero_stage=2",
        "deepspeed.precision=bf16",
        "deepspeed.micro_batch=1",
        *_data_overrides(root),
    ]
    out = _run(args)
    result = json.loads((run_dir / "result.json").read_text())
    assert result["step"] == 4 and result["AP"] is not None, out[-3000:]
    assert "world 2 | ZeRO-2 bf16 | batch 2 = 1 x 1 x 2" in out
    export = run_dir / "detector.pth"
    stats = {}
    for nproc in (1, 2):
        out_json = tmp_path / f"eval{nproc}.json"
        launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2"] if nproc == 2 else []
        args = ["--weights", str(export), "--ann", str(root / "annotations.json"), "--images", str(root)]
        _run([*launcher, "launch/evaluate_detr.py", *args, "--json", str(out_json)])
        stats[nproc] = json.loads(out_json.read_text())
    assert stats[2] == stats[1], stats
