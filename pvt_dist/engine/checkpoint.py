"""Collective checkpoints under ``RUN_DIR/checkpoints/step_NNNNNNNN/`` with an atomic ``latest`` pointer.

A checkpoint directory holds DeepSpeed's files (module, optimizer partitions, client state), one
``rank_NNNNN.pt`` per rank (RNG states and data position, which differ between ranks) and
``trainer_state.json``, written by rank 0 only after every rank has finished writing. ``latest`` is
replaced atomically after that, so it never names a partial checkpoint; a crash mid-save leaves
the previous ``latest`` intact and the partial directory is removed by the next save.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import time
from typing import Any

import numpy as np
import torch

from pvt_dist.cluster import distributed as pdist
from pvt_dist.engine.universal import UNIVERSAL_SUFFIX, ensure_universal, has_zero_partitions

log = logging.getLogger(__name__)

_TAG = re.compile(r"^step_(\d{8,})$")
STATE_FILE = "trainer_state.json"
# Tests only (tests/test_faults.py): "STEP:SECONDS:PREFIX" makes every rank, once all ranks' files of step
# STEP are on disk but before trainer_state.json and `latest` are written, create PREFIX.rankN and sleep
# SECONDS, so a fault can be injected exactly between DeepSpeed's files and `latest`.
# What our checkpoints pickle beyond tensors and builtins: numpy's RNG state (a uint32 array) in the rank
# states; DeepSpeed's loss scaler, ZeRO stage enum and fragment addresses in its optimizer states.
_np_core = getattr(np, "_core", None) or np.core
NUMPY_RNG_GLOBALS = [_np_core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
DEEPSPEED_PICKLED = (
    "deepspeed.runtime.fp16.loss_scaler.",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
PAUSE_ENV = "PVT_DIST_TEST_PAUSE_BEFORE_LATEST"


def _test_pause(step: int, rank: int) -> None:
    spec = os.environ.get(PAUSE_ENV)
    if not spec:
        return
    at, seconds, prefix = spec.split(":", 2)
    if int(at) == step:
        # Stands for a process that dies inside the save: the launcher's SIGTERM (sent when a peer died)
        # ends it at once instead of after the launcher's 30 s grace, and it never writes `latest`.
        previous = signal.signal(signal.SIGTERM, lambda *_: os._exit(143))
        with open(f"{prefix}.rank{rank}", "w") as f:
            f.write(str(os.getpid()))
        time.sleep(float(seconds))
        signal.signal(signal.SIGTERM, previous)


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new content, never a mix."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_torch_save(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_pickles(tag_dir: str) -> None:
    """Refuse a checkpoint whose files pickle anything but tensors, builtins and the types we allow.

    For the files DeepSpeed unpickles in full (``weights_only=False``: its engine and ``zero_to_fp32``):
    a run directory handed over by someone else is scanned, without executing it, before any of it loads.
    """
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in NUMPY_RNG_GLOBALS}
    allowed.add("numpy.core.multiarray._reconstruct")  # numpy < 2
    for name in sorted(os.listdir(tag_dir)):
        path = os.path.join(tag_dir, name)
        if not name.endswith(".pt") or not os.path.isfile(path):
            continue
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception as e:  # noqa: BLE001 - not a torch zip file at all
            raise ValueError(f"{path}: not a readable torch checkpoint file: {e}") from e
        bad = [g for g in found if g not in allowed and not g.startswith(DEEPSPEED_PICKLED)]
        if bad:
            raise ValueError(
                f"{path} pickles {bad}, which a checkpoint of this project never holds; refusing to unpickle "
                "it (loading it could run arbitrary code)"
            )


def safe_load(path: str):
    """``torch.load(weights_only=True)`` of one of our checkpoint files, allowing the types it may hold."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [*NUMPY_RNG_GLOBALS, LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


def read_latest(ckpt_dir: str) -> str | None:
    """Tag named by ``latest`` if that checkpoint is complete, else None (a fresh run)."""
    path = os.path.join(ckpt_dir, "latest")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        tag = f.read().strip()
    if not os.path.isfile(os.path.join(ckpt_dir, tag, STATE_FILE)):
        raise RuntimeError(f"{path} names {tag!r}, which is not a complete checkpoint (no {STATE_FILE})")
    return tag


def read_trainer_state(ckpt_dir: str, tag: str) -> dict:
    with open(os.path.join(ckpt_dir, tag, STATE_FILE)) as f:
        return json.load(f)


def check_writable(ckpt_dir: str, rank: int) -> None:
    """Fail at start-up, naming the directory, if this rank cannot write checkpoints there."""
    try:
        os.makedirs(ckpt_dir, exist_ok=True)
        probe = os.path.join(ckpt_dir, f".write_probe.{rank}.{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"ok")
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as e:
        raise RuntimeError(f"checkpoint directory {ckpt_dir} is not writable: {e}") from e


class CheckpointManager:
    """Saves and restores training state collectively; keeps the last ``keep_last`` checkpoints."""

    def __init__(self, ckpt_dir: str, rank: int, world_size: int, keep_last: int):
        self.dir = ckpt_dir
        self.rank = rank
        self.world_size = world_size
        self.keep_last = keep_last

    def latest(self) -> str | None:
        return read_latest(self.dir)

    def resume_tag(self) -> str | None:
        """One resume decision for every rank (collective): the tag rank 0 finds in `latest`, or None.

        Rank 0 reads `latest` (a complete checkpoint only) and broadcasts the tag; every rank then checks it
        sees that checkpoint, and all fail together if one does not, the blind rank naming the path and
        its host: ranks reading `latest` on their own could resume from different steps, or one could
        start afresh, when the run directory is not the same filesystem on every node.
        """
        decision = (None, None)
        if self.rank == 0:
            try:
                decision = (self.latest(), None)
            except RuntimeError as e:
                decision = (None, str(e))
        tag, error = pdist.broadcast_object(decision)
        if error is not None:
            raise RuntimeError(error)
        if tag is None:
            return None
        state = os.path.join(self.dir, tag, STATE_FILE)
        blind = None if os.path.isfile(state) else socket.gethostname()
        views = [blind]
        if pdist.is_initialized():
            views = [None] * self.world_size
            torch.distributed.all_gather_object(views, blind)
        if blind is not None:
            raise RuntimeError(
                f"rank {self.rank} on host {blind} cannot see {state}, the checkpoint rank 0 resumes from: "
                "the run dir is not shared across nodes. Put run_dir on a filesystem every node mounts at "
                "the same path (NFS, Lustre, GPFS)"
            )
        failed = [r for r, host in enumerate(views) if host is not None]
        if failed:
            raise RuntimeError(
                f"rank(s) {failed} on {sorted(set(views) - {None})} cannot see checkpoint {tag} in "
                f"{self.dir}: the run dir is not shared across nodes (see their error)"
            )
        return tag

    def save(self, engine, step: int, client_state: dict, rank_state: dict, meta: dict) -> str:
        """Every rank calls this at the same step. Returns the checkpoint path."""
        tag = tag_for(step)
        path = os.path.join(self.dir, tag)
        t0 = time.perf_counter()
        try:
            if self.rank == 0 and os.path.isdir(path):
                shutil.rmtree(path)  # leftovers of a save that crashed before `latest` moved
                shutil.rmtree(path + UNIVERSAL_SUFFIX, ignore_errors=True)  # converted from those
            pdist.barrier()
            engine.save_checkpoint(self.dir, tag=tag, client_state=client_state, save_latest=False)
            atomic_torch_save(rank_state, os.path.join(path, f"rank_{self.rank:05d}.pt"))
        except (OSError, RuntimeError) as e:
            # torch.save reports ENOSPC as a bare stream error ("unexpected pos ..."): add the free space.
            free = shutil.disk_usage(self.dir).free / 2**20
            raise RuntimeError(
                f"checkpoint: saving step {step} to {path} failed ({free:.0f} MiB free there): {e}"
            ) from e
        pdist.barrier()  # every rank's files are on disk
        _test_pause(step, self.rank)
        if self.rank == 0:
            for name in os.listdir(path):
                full = os.path.join(path, name)
                if os.path.isfile(full):
                    with open(full, "rb") as f:
                        os.fsync(f.fileno())
            state = dict(meta, step=step, world_size=self.world_size, saved_at=time.time())
            atomic_write_text(os.path.join(path, STATE_FILE), json.dumps(state, indent=1))
            atomic_write_text(os.path.join(self.dir, "latest"), tag)
            self._prune(tag)
        pdist.barrier()
        log.info("saved checkpoint %s (%.1fs)", path, time.perf_counter() - t0)
        return path

    def _prune(self, latest: str) -> None:
        complete, other = [], []
        for name in os.listdir(self.dir):
            m = _TAG.match(name)
            if not m or not os.path.isdir(os.path.join(self.dir, name)):
                continue
            if os.path.isfile(os.path.join(self.dir, name, STATE_FILE)):
                complete.append((int(m.group(1)), name))
            elif name != latest:
                other.append(name)
        complete.sort()
        keep = {name for _, name in complete[-self.keep_last :]} | {latest}
        for _, name in complete:
            if name not in keep:
                shutil.rmtree(os.path.join(self.dir, name), ignore_errors=True)
        for name in other:  # partial directories of crashed saves
            shutil.rmtree(os.path.join(self.dir, name), ignore_errors=True)
        for name in os.listdir(self.dir):  # universal conversions (universal.py) of removed checkpoints
            base = name.removesuffix(UNIVERSAL_SUFFIX)
            if base != name and _TAG.match(base) and base not in keep:
                shutil.rmtree(os.path.join(self.dir, name), ignore_errors=True)
        pointer = os.path.join(self.dir, "latest_universal")  # ds_to_universal's; stale once its target goes
        with contextlib.suppress(OSError):
            with open(pointer) as f:
                target = f.read().strip()
            if not os.path.isdir(os.path.join(self.dir, target)):
                os.remove(pointer)

    def _export_hint(self) -> str:
        return (
            f"export the weights with `python -m pvt_dist.export {os.path.dirname(self.dir)} weights.pth` "
            "and start a new run with model.pretrained=weights.pth"
        )

    def rank_state(self, tag: str, rank: int) -> dict:
        """RNG and data position that rank ``rank`` saved in ``tag``."""
        return safe_load(os.path.join(self.dir, tag, f"rank_{rank:05d}.pt"))

    def load(self, engine, tag: str, expect: dict | None = None) -> tuple[dict, dict | None, dict]:
        """Restore engine state from ``tag``; returns (client_state, this rank's state, trainer_state).

        ``expect`` maps trainer_state keys (zero_stage, precision, ...) to this run's values; a checkpoint
        that differs is refused before DeepSpeed touches it, except in the world size and the ZeRO stage:
        those resume elastically, through a universal checkpoint (``universal.py``). This rank's state is
        then None when the writing run had no rank of this number (the caller re-derives it).
        """
        meta = read_trainer_state(self.dir, tag)
        path = os.path.join(self.dir, tag)
        expect = dict(expect or {})
        stage = expect.pop("zero_stage", meta.get("zero_stage"))
        for key, value in expect.items():
            if key in meta and meta[key] != value:
                raise RuntimeError(
                    f"checkpoint {path} was written with {key}={meta[key]!r}, this run has {value!r}. "
                    f"Resume with the same setting, or {self._export_hint()}"
                )
        saved_world, saved_stage = meta.get("world_size"), meta.get("zero_stage", stage)
        elastic = (saved_world, saved_stage) != (self.world_size, stage)
        load_tag = self._elastic_tag(tag, path, saved_world, saved_stage, stage) if elastic else tag
        rank_file = os.path.join(path, f"rank_{self.rank:05d}.pt")
        if not elastic and not os.path.isfile(rank_file):
            raise RuntimeError(f"checkpoint {path} has no state for rank {self.rank} ({rank_file})")
        # DeepSpeed unpickles its own files in full (torch_checkpoint_engine: weights_only=False), so a
        # resume only ever loads this run's checkpoints/ (never a path from the command line); run dirs
        # from elsewhere go through `python -m pvt_dist.export`, which loads with weights_only=True.
        universal = load_tag != tag
        # DeepSpeed reads `load_universal` at load time only (engine.load_checkpoint and the ZeRO
        # optimizers' load_state_dict), so it is switched on for this one load.
        engine._config.load_universal_checkpoint = universal
        try:
            load_path, client_state = engine.load_checkpoint(self.dir, tag=load_tag)
        finally:
            engine._config.load_universal_checkpoint = False
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {os.path.join(self.dir, load_tag)}")
        rank_state = safe_load(rank_file) if os.path.isfile(rank_file) else None
        return client_state or {}, rank_state, meta

    def _elastic_tag(self, tag: str, path: str, world: int, stage: int, new_stage: int) -> str:
        """The tag to load for a resume on another world size or ZeRO stage (converted if needed)."""
        source = f"{world} ranks, ZeRO-{stage}"
        target = f"{self.world_size} ranks, ZeRO-{new_stage}"
        if has_zero_partitions(path):
            if new_stage == 0:
                raise RuntimeError(
                    f"checkpoint {path} ({source}) cannot resume at ZeRO-0: DeepSpeed loads universal "
                    f"checkpoints into ZeRO optimizers only. Resume with deepspeed.zero_stage >= 1, or "
                    f"{self._export_hint()}"
                )
            if (stage == 3) != (new_stage == 3):
                # DeepSpeed 0.19's ZeRO-3 universal loader reads the optimizer state in the layout its own
                # ZeRO-3 conversion writes (KeyError 'optimizer_state_dict' on a ZeRO-1/2 conversion).
                same = "3" if stage == 3 else "1 or 2"
                raise RuntimeError(
                    f"checkpoint {path} ({source}) cannot resume at ZeRO-{new_stage}: DeepSpeed's universal "
                    f"checkpoints do not cross between ZeRO-1/2 and ZeRO-3. Resume with "
                    f"deepspeed.zero_stage={same} (any world size), or {self._export_hint()}"
                )
            return ensure_universal(self.dir, tag, self.rank, source, target)
        if new_stage != 0:
            raise RuntimeError(
                f"checkpoint {path} ({source}) has no ZeRO partitions to convert for ZeRO-{new_stage}. "
                f"Resume with deepspeed.zero_stage=0, or {self._export_hint()}"
            )
        # ZeRO-0: every rank saved the whole optimizer state (rank 0's file): it loads on any world size.
        log.info("elastic resume: %s -> %s (unpartitioned state, loaded as is)", source, target)
        return tag
