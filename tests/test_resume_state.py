"""The resume helpers alone (``pvt_dist/engine/resume.py``): RNG round trip, the global-batch guard and the
data position of an elastic resume. The end-to-end resumes are in test_elastic_resume.py; test_faults.py
checks the guard's refusal on a real relaunch.
"""

from __future__ import annotations

import dataclasses
import logging
import random

import numpy as np
import pytest
import torch

from pvt_dist.config import TrainConfig
from pvt_dist.engine.resume import (
    check_global_batch,
    elastic_data_position,
    elastic_rng,
    rng_state,
    set_rng_state,
)


def draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_rng_state_round_trip_repeats_every_stream():
    torch.manual_seed(5)
    saved = rng_state()
    first = draws()
    set_rng_state(saved)
    assert draws() == first
    assert draws() != first  # the streams moved on: the equality above is not trivial


def config(global_batch: int, allow: bool = False) -> TrainConfig:
    cfg = TrainConfig()
    return dataclasses.replace(
        cfg,
        deepspeed=dataclasses.replace(cfg.deepspeed, global_batch=global_batch, micro_batch=16, grad_accum=2),
        optim=dataclasses.replace(cfg.optim, lr=5e-4, lr_ref_batch=512, scale_lr=True),
        checkpoint=dataclasses.replace(cfg.checkpoint, allow_global_batch_change=allow),
    )


def test_global_batch_change_is_refused_naming_key_checkpoint_and_values():
    with pytest.raises(RuntimeError) as e:
        check_global_batch(config(64), 2, "/runs/a/checkpoints/step_00000010", {"global_batch": 128})
    msg = str(e.value)
    assert msg.startswith("deepspeed.global_batch:")
    assert "/runs/a/checkpoints/step_00000010" in msg and "128" in msg and "64" in msg
    assert "deepspeed.global_batch=128" in msg and "checkpoint.allow_global_batch_change=true" in msg


def test_same_or_unrecorded_global_batch_passes():
    check_global_batch(config(64), 2, "ckpt", {"global_batch": 64})
    check_global_batch(config(64), 2, "ckpt", {})  # checkpoints written before the batch was recorded


def test_allowed_global_batch_change_logs_the_scaled_peak_lr(caplog):
    with caplog.at_level(logging.WARNING, logger="pvt_dist.train"):
        check_global_batch(config(64, allow=True), 2, "ckpt", {"global_batch": 128})
    # 5e-4 x 64 / 512 = 6.25e-5
    assert "global batch 128 -> 64" in caplog.text and "peak lr 6.25e-05" in caplog.text


def test_global_order_continues_from_the_samples_consumed():
    position = {"order": "global", "epoch": 3, "samples": 1000}
    assert elastic_data_position({"epoch": 3, "loader": position}, 1, 4, 2) == (3, position)


def test_per_rank_position_mid_epoch_restarts_at_the_next_epoch(caplog):
    data = {"epoch": 2, "loader": {"epoch": 2, "batch": 5, "batches_per_epoch": 20}}
    with caplog.at_level(logging.WARNING, logger="pvt_dist.train"):
        assert elastic_data_position(data, 0, 1, 2) == (3, None)
    assert (
        "2 -> 1 ranks mid-epoch 2" in caplog.text and "its last 15 batches per rank of epoch 2" in caplog.text
    )


def test_per_rank_position_at_an_epoch_start_keeps_that_epoch():
    data = {"epoch": 4, "loader": {"epoch": 4, "batch": 0, "batches_per_epoch": 20}}
    assert elastic_data_position(data, 0, 1, 2) == (4, None)


def test_elastic_rng_new_rank_is_seeded_from_seed_step_rank_and_old_rank_continues():
    cfg = TrainConfig()
    elastic_rng(cfg, 40, 3, None)
    a = draws()
    elastic_rng(cfg, 40, 3, None)
    assert draws() == a  # deterministic in (seed, step, rank)
    elastic_rng(cfg, 40, 2, None)
    assert draws() != a  # another rank, another stream
    torch.manual_seed(11)
    saved = {"rng": rng_state()}
    expected = draws()
    elastic_rng(cfg, 40, 3, saved)
    assert draws() == expected  # a rank the writing run had continues its own stream
