"""launch/evaluate.py on a real tiny run's exports: the run's own validation numbers, any rank count, ReaL
labels, per-class CSV, and a clear exit 2 for each bad input."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from launch_helpers import ROOT, evaluate, export_weights, rank_env, tiny_run_yaml


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, fmnist_shards) -> dict:
    """An 8-step bf16 ZeRO-2 run with EMA (trained by launch/train.py), exported plain and EMA."""
    base = tmp_path_factory.mktemp("eval-run")
    cfg, run = base / "tiny.yaml", base / "run"
    rest = """
optim: {lr: 2.0e-3, scale_lr: false, weight_decay: 0.01}
schedule: {total_steps: 8, warmup_steps: 1, min_lr: 1.0e-4}
deepspeed: {zero_stage: 2, precision: bf16, micro_batch: 32, grad_accum: 1}
eval: {every_steps: 1000, at_end: true}
ema: {enabled: true, decay: 0.9}
logging: {log_every: 4, tensorboard: false}
dist: {timeout_s: 120}
"""
    cfg.write_text(tiny_run_yaml(fmnist_shards, rest))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(cfg), f"run_dir={run}"],
        capture_output=True, text=True, env=rank_env(), cwd=ROOT, timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    export_weights(run, base / "w.pth")
    export_weights(run, base / "ema.pth", "--ema")
    vals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"kind": "val"' in x]
    return {
        "run": run,
        "w": base / "w.pth",
        "ema": base / "ema.pth",
        "val": vals[-1],
        "shards": fmnist_shards,
    }


def test_export_scores_the_runs_own_final_validation(tiny_run, tmp_path):
    """The trainer's last val/top1 (metrics.jsonl), reproduced from the export with the run's config."""
    run, val = tiny_run["run"], tiny_run["val"]
    out = tmp_path / "w.json"
    common = ["--shards", str(tiny_run["shards"]), "--config", str(run / "config.yaml")]
    evaluate("--weights", str(tiny_run["w"]), *common, "--json", str(out))
    res = json.loads(out.read_text())
    assert res["count"] == val["val/count"] == 512
    assert res["precision"] == "bf16"  # from the run's config, as the trainer validated
    assert res["top1"] == val["val/top1"] and res["top5"] == val["val/top5"], (res, val)
    assert res["loss"] == pytest.approx(val["val/loss"], rel=1e-5)
    # The trainer validates EMA weights in fp32.
    evaluate("--weights", str(tiny_run["ema"]), *common, "--precision", "fp32", "--json", str(out))
    assert json.loads(out.read_text())["top1"] == val["val_ema/top1"]


def read_per_class(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_two_ranks_count_every_image_once(tiny_run, tmp_path):
    """Padded last batches (256 per rank, batch 60) leave counts, per-class hits and top-1 unchanged."""
    common = ["--weights", str(tiny_run["w"]), "--shards", str(tiny_run["shards"]), "--model", "pvt_v2_b0"]
    common += ["--size", "32", "--crop-pct", "1.0", "--batch", "60"]
    outs = {}
    for n in (1, 2):
        evaluate(
            *common, "--json", str(tmp_path / f"{n}.json"), "--per-class", str(tmp_path / f"{n}.csv"), nproc=n
        )
        outs[n] = json.loads((tmp_path / f"{n}.json").read_text()), read_per_class(tmp_path / f"{n}.csv")
    (r1, c1), (r2, c2) = outs[1], outs[2]
    assert r1["world_size"] == 1 and r2["world_size"] == 2
    assert r1["count"] == r2["count"] == 512
    assert (r1["top1"], r1["top5"]) == (r2["top1"], r2["top5"])
    assert c1 == c2
    assert sum(int(r["count"]) for r in c1) == 512
    assert sum(int(r["top1_correct"]) for r in c1) == round(r1["top1"] * 512 / 100)
    assert [r["name"] for r in c1][:2] == ["T-shirt/top", "Trouser"]  # names from the shards' manifest


def val_labels(shards: Path) -> dict[int, int]:
    """Validation index (fmnist_val_NNNNN) -> true label, read straight from the tar."""
    out = {}
    for tar in sorted(shards.glob("val-*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                if m.name.endswith(".cls"):
                    out[int(m.name.split(".")[0].rsplit("_", 1)[1])] = int(t.extractfile(m).read())
    return out


def test_real_labels_end_to_end(tiny_run, tmp_path):
    """ReaL lists = the true label reproduce top-1/5; emptying class 0's lists drops exactly those images."""
    labels = val_labels(tiny_run["shards"])
    size = max(labels) + 1
    common = ["--weights", str(tiny_run["w"]), "--shards", str(tiny_run["shards"]), "--model", "pvt_v2_b0"]
    common += ["--size", "32", "--crop-pct", "1.0", "--precision", "fp32"]
    same = [[labels[i]] if i in labels else [] for i in range(size)]
    (tmp_path / "same.json").write_text(json.dumps(same))
    evaluate(*common, "--real-labels", str(tmp_path / "same.json"), "--json", str(tmp_path / "a.json"),
             "--per-class", str(tmp_path / "pc.csv"))  # fmt: skip
    a = json.loads((tmp_path / "a.json").read_text())
    assert a["real_count"] == 512 and a["real_top1"] == a["top1"] and a["real_top5"] == a["top5"]

    no_zero = [[] if x == [0] else x for x in same]
    (tmp_path / "nz.json").write_text(json.dumps(no_zero))
    evaluate(*common, "--real-labels", str(tmp_path / "nz.json"), "--json", str(tmp_path / "b.json"))
    b = json.loads((tmp_path / "b.json").read_text())
    zero = read_per_class(tmp_path / "pc.csv")[0]
    n0, hits0 = int(zero["count"]), int(zero["top1_correct"])
    assert n0 == sum(1 for v in labels.values() if v == 0) > 0
    assert b["real_count"] == 512 - n0
    assert b["real_top1"] == pytest.approx(100.0 * (a["top1"] * 512 / 100 - hits0) / (512 - n0))


def test_real_label_math_on_a_hand_made_batch():
    from pvt_dist.engine.classify_eval import RealLabelCounts, val_index

    assert val_index("val-000000.tar:ILSVRC2012_val_00000001") == 0
    assert val_index("val-000003.tar:ILSVRC2012_val_00050000") == 49999
    assert val_index("val-000000.tar:fmnist_val_08083") == 8083
    real = [[3], [], [1, 2], [0], [7]]
    counts = RealLabelCounts(real, torch.device("cpu"))
    logits = torch.full((4, 10), -10.0)
    logits[0, 3] = 5  # image 0: top-1 3, accepted -> hit@1, hit@5
    logits[1, 3] = 5  # image 1: no acceptable label -> not scored
    logits[2, 2] = 5  # image 2: top-1 2, the second accepted label -> hit@1
    logits[3, 4], logits[3, 0] = 5, 4  # image 3: top-1 4 (miss), 0 second -> hit@5 only
    keys = [f"val-000000.tar:ILSVRC2012_val_{i:08d}" for i in (1, 2, 3, 4)]
    counts.update(logits, torch.tensor([3, 5, 1, 0]), keys)
    res = counts.result()
    assert res["real_count"] == 3
    assert res["real_top1"] == pytest.approx(200 / 3)
    assert res["real_top5"] == pytest.approx(100.0)


@pytest.mark.parametrize(
    "case, extra, message",
    [
        ("missing shard", ["--shards", "/nonexistent/val-{000000..000001}.tar"], "does not exist"),
        ("class count", ["--num-classes", "7"], "10-class head but the data has 7 classes"),
        ("other model", ["--model", "pvt_v2_b1"], "does not fit model 'pvt_v2_b1'"),
        ("no head", ["--weights", "BACKBONE"], "has no classification head"),
        ("missing weights", ["--weights", "/nonexistent/w.pth"], "not found"),
    ],
)
def test_bad_input_exits_2_before_any_work(case, extra, message, tiny_run, tmp_path):
    weights = str(tiny_run["w"])
    if "BACKBONE" in extra:  # a backbone export: the classifier without its head and final norm
        sd = torch.load(weights, weights_only=True)
        torch.save({k: v for k, v in sd.items() if not k.startswith("head.")}, tmp_path / "bb.pth")
        extra = ["--weights", str(tmp_path / "bb.pth")]
    args = {"--weights": weights, "--shards": str(tiny_run["shards"]), "--model": "pvt_v2_b0", "--size": "32"}
    for flag, value in zip(extra[::2], extra[1::2]):
        args[flag] = value
    out = tmp_path / "never.json"
    proc = evaluate(*[x for kv in args.items() for x in kv], "--json", str(out), expect=2)
    assert message in proc.stderr, proc.stderr
    assert not out.exists()
    assert "top-1" not in proc.stdout
