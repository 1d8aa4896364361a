"""One resume decision (CheckpointManager.resume_tag): rank 0 reads `latest` and broadcasts the tag; a rank
whose run directory is not rank 0's (a node-local path where a shared one was meant) fails, naming the
path and host, and the other ranks fail with it instead of waiting. Two real gloo ranks; each rank's
"node" is a directory of its own."""

from __future__ import annotations

import json
import os
import socket

import torch.distributed as dist
import torch.multiprocessing as mp
from launch_helpers import free_port

from pvt_dist.engine.checkpoint import STATE_FILE, CheckpointManager


def make_checkpoint(ckpt_dir, tag: str) -> None:
    (ckpt_dir / tag).mkdir(parents=True)
    (ckpt_dir / tag / STATE_FILE).write_text(json.dumps({"step": 4, "world_size": 2}))
    (ckpt_dir / "latest").write_text(tag)


def _worker(rank, port, dirs, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        q.put((rank, "tag", CheckpointManager(dirs[rank], rank, 2, 2).resume_tag()))
    except RuntimeError as e:
        q.put((rank, "error", str(e)))
    dist.destroy_process_group()


def _run(dirs) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, [str(d) for d in dirs], q)) for r in (0, 1)]
    for p in procs:
        p.start()
    out = {}
    for _ in procs:
        rank, kind, value = q.get(timeout=120)
        out[rank] = (kind, value)
    for p in procs:
        p.join(timeout=30)
    return out


def test_every_rank_resumes_rank0s_tag(tmp_path):
    shared = tmp_path / "run" / "checkpoints"
    make_checkpoint(shared, "step_00000004")
    out = _run([shared, shared])
    assert out == {0: ("tag", "step_00000004"), 1: ("tag", "step_00000004")}


def test_rank_that_cannot_see_the_checkpoint_fails_naming_path_and_host(tmp_path):
    node0, node1 = tmp_path / "node0" / "checkpoints", tmp_path / "node1" / "checkpoints"
    make_checkpoint(node0, "step_00000004")
    node1.mkdir(parents=True)
    (node1 / "latest").write_text("step_00000002")  # what rank 1 would resume from on its own: ignored
    out = _run([node0, node1])
    kind, msg = out[1]
    missing = node1 / "step_00000004" / STATE_FILE
    assert kind == "error"
    assert f"rank 1 on host {socket.gethostname()} cannot see {missing}" in msg, msg
    assert "the run dir is not shared across nodes" in msg
    kind, msg = out[0]
    assert kind == "error" and "rank(s) [1]" in msg and "not shared across nodes" in msg, msg


def test_prune_removes_old_universal_conversions_and_their_stale_pointer(tmp_path):
    """keep_last 1: the step-2 checkpoint, its universal conversion and ds_to_universal's
    `latest_universal` pointer to it go; the step-4 checkpoint stays. A pointer to a kept conversion stays."""
    from pvt_dist.engine.checkpoint import STATE_FILE

    ckpt = tmp_path / "checkpoints"
    for name in ("step_00000002", "step_00000004"):
        (ckpt / name).mkdir(parents=True)
        (ckpt / name / STATE_FILE).write_text("{}")
    (ckpt / "step_00000002_universal").mkdir()
    (ckpt / "latest_universal").write_text("step_00000002_universal")
    CheckpointManager(str(ckpt), 0, 1, 1)._prune("step_00000004")
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_00000004"]

    (ckpt / "step_00000004_universal").mkdir()
    (ckpt / "latest_universal").write_text("step_00000004_universal")
    CheckpointManager(str(ckpt), 0, 1, 1)._prune("step_00000004")
    assert (ckpt / "latest_universal").read_text() == "step_00000004_universal"
