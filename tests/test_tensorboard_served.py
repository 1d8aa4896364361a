"""The real `tensorboard` server on finished tiny runs of both stages serves every scalar tag that README.md
promises, with one point per step it was written at; plus the profiler trace of `logging.profile_steps`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from detection_helpers import labelme_example
from launch_helpers import ROOT, free_port, rank_env, tiny_run_yaml

STEPS, LOG_EVERY, EVAL_EVERY, SAVE_EVERY = 8, 3, 4, 4  # log steps 3, 6, 8; eval 4, 8; saves 4, 8


def readme_tags() -> list[tuple[str, set[int], str]]:
    """(tag, stages, when) rows of README's TensorBoard table."""
    text = (ROOT / "README.md").read_text()
    table = text.split("<!-- tensorboard-tags: stage | when -->", 1)[1].split(
        "<!-- /tensorboard-tags -->", 1
    )[0]
    rows = []
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        stages = {int(s) for s in cells[1].split(",")}
        rows += [(tag, stages, cells[2]) for tag in re.findall(r"`([^`]+)`", cells[0])]
    assert len(rows) > 30, "README's TensorBoard table went missing"
    return rows


def expected_steps(when: str) -> list[int] | None:
    """Steps a tag is written at in these runs; None for tags these CPU runs cannot write (fp16)."""
    if "fp16" in when:
        return None
    logs = sorted({*range(LOG_EVERY, STEPS + 1, LOG_EVERY), STEPS})
    table = {
        "every step": list(range(1, STEPS + 1)),
        "every log step": logs,
        "every checkpoint save": list(range(SAVE_EVERY, STEPS + 1, SAVE_EVERY)),
        "every validation": list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY)),
    }
    return table[when.split(",")[0].strip()]


def run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=rank_env(), cwd=ROOT, timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


CADENCE = [
    f"schedule.total_steps={STEPS}", f"logging.log_every={LOG_EVERY}", f"eval.every_steps={EVAL_EVERY}",
    f"checkpoint.every_steps={SAVE_EVERY}", "logging.tensorboard=true",
]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fmnist_shards) -> Path:
    """runs/stage1 (pvt_v2_b0 classifier, EMA, profile steps 2-3) and runs/stage2 (DETR on labelme)."""
    root = tmp_path_factory.mktemp("tb-runs")
    cfg = root / "stage1.yaml"
    rest = """
optim: {lr: 2.0e-3, scale_lr: false, weight_decay: 0.01}
schedule: {warmup_steps: 1, min_lr: 1.0e-4}
deepspeed: {zero_stage: 1, precision: bf16, micro_batch: 32, grad_accum: 1}
ema: {enabled: true, decay: 0.9}
logging: {profile_steps: [2, 3]}
dist: {timeout_s: 120}
"""
    cfg.write_text(tiny_run_yaml(fmnist_shards, rest))
    run([sys.executable, "launch/train.py", "--config", str(cfg), f"run_dir={root / 'stage1'}", *CADENCE])
    coco = labelme_example()
    ann = coco / "annotations.json"
    run([
        sys.executable, "launch/finetune_detr.py", "--config", "configs/detr/labelme_overfit.yaml",
        f"run_dir={root / 'stage2'}", f"data.train_ann={ann}", f"data.train_images={coco}",
        f"data.val_ann={ann}", f"data.val_images={coco}", *CADENCE,
    ])  # fmt: skip
    return root


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(runs):
    """`tensorboard --logdir runs` on a free 127.0.0.1 port; yields its base URL once both runs are loaded."""
    port = free_port()
    cmd = [str(ROOT / ".venv" / "bin" / "tensorboard"), "--logdir", str(runs), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--load_fast", "false", "--reload_interval", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline, tags = time.time() + 120, {}
        while time.time() < deadline:
            assert proc.poll() is None, f"tensorboard exited: {proc.stdout.read()[-2000:]}"
            try:
                tags = get_json(f"{base}/data/plugin/scalars/tags")
            except OSError:
                tags = {}
            done = {r: t for r, t in tags.items() if "val/top1" in t or "val/AP" in t}
            if len(done) == 2:
                break
            time.sleep(1)
        assert len(tags) == 2, f"tensorboard serves runs {sorted(tags)}"
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode is not None


def test_served_scalars_match_the_readme_table(server):
    tags = get_json(f"{server}/data/plugin/scalars/tags")
    by_stage = {1: "stage1/tensorboard", 2: "stage2/tensorboard"}
    assert set(tags) == set(by_stage.values())
    checked = 0
    for tag, stages, when in readme_tags():
        steps = expected_steps(when)
        for stage in stages:
            run_name = by_stage[stage]
            if steps is None:
                assert tag not in tags[run_name], f"{tag} is fp16-only but {run_name} (bf16/fp32) has it"
                continue
            if "not under ZeRO-0 fp32" in when and stage == 2:  # the DETR run is ZeRO-0 fp32
                assert tag not in tags[run_name], f"{tag}: README says ZeRO-0 fp32 runs lack it"
                continue
            assert tag in tags[run_name], (
                f"README promises {tag} for stage {stage}; served: {sorted(tags[run_name])}"
            )
            query = urllib.parse.urlencode({"run": run_name, "tag": tag})
            points = get_json(f"{server}/data/plugin/scalars/scalars?{query}")  # [[wall_time, step, value]]
            assert [p[1] for p in points] == steps, f"{run_name} {tag}"
            checked += 1
    assert checked > 40
    # The MFU figures are consistent: TFLOP/s per GPU over the measured peak, in percent, and positive.
    q = lambda t: urllib.parse.urlencode({"run": by_stage[1], "tag": t})  # noqa: E731
    tflops = [p[2] for p in get_json(f"{server}/data/plugin/scalars/scalars?{q('perf/tflops_per_gpu')}")]
    mfu = [p[2] for p in get_json(f"{server}/data/plugin/scalars/scalars?{q('perf/mfu')}")]
    assert all(t > 0 for t in tflops) and all(0 < m < 100 for m in mfu)
    ratios = [t / m for t, m in zip(tflops, mfu)]  # = peak / 100, the same at every log step
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-4)


def test_profile_steps_write_a_chrome_trace(runs):
    traces = list((runs / "stage1" / "profile").glob("rank0.*.pt.trace.json"))
    assert len(traces) == 1, list((runs / "stage1" / "profile").iterdir())
    trace = json.loads(traces[0].read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    # Exactly the two profiled steps are marked, and the model's matmuls are in the trace.
    assert {n for n in names if n.startswith("train_step ")} == {"train_step 2", "train_step 3"}
    assert any(n.startswith("aten::") and "mm" in n for n in names)
    assert not (runs / "stage2" / "profile").exists()


@pytest.mark.parametrize(
    "field, value",
    [("profile_steps", [3, 2]), ("profile_steps", [0, 2]), ("profile_steps", [4]), ("peak_tflops", 0.0)],
)
def test_bad_logging_values_name_their_key(field, value):
    from pvt_dist.config import ConfigError, LoggingConfig, check_logging

    with pytest.raises(ConfigError, match=f"logging.{field}"):
        check_logging(LoggingConfig(**{field: value}))
