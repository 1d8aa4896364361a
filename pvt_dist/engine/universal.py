"""Elastic resume: a checkpoint of W ranks at ZeRO stage Z, loaded by W' ranks at stage Z'.

ZeRO-1/2/3 partition the fp32 master weights and the Adam moments over the data-parallel ranks, so their
files only fit the world that wrote them. DeepSpeed's ``ds_to_universal`` merges the partitions into one
file per parameter and state (``zero/<param>/{fp32,exp_avg,exp_avg_sq}.pt``) that ``load_universal``
slices for any world and stage. The conversion runs once, on rank 0, into ``step_N_universal`` next to
``step_N`` (which is never modified): it is written to a temporary directory and renamed into place, so a
crash mid-conversion leaves no half-written universal checkpoint, only a temporary one the next attempt
removes. The other ranks wait for rank 0's verdict.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import subprocess
import sys
import time

from pvt_dist.cluster import distributed as pdist

log = logging.getLogger(__name__)

UNIVERSAL_SUFFIX = "_universal"


def universal_tag(tag: str) -> str:
    return tag + UNIVERSAL_SUFFIX


def has_zero_partitions(tag_dir: str) -> bool:
    """True when the checkpoint holds ZeRO optimizer partitions (``*_optim_states.pt``), i.e. stage >= 1."""
    return bool(glob.glob(os.path.join(tag_dir, "*_optim_states.pt")))


def _fsync_tree(root: str) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())


def _convert(src: str, dst: str, workers: int) -> None:
    """``python -m deepspeed.checkpoint.ds_to_universal`` from ``src`` into a fresh temporary dir, renamed
    to ``dst``. A separate process: the conversion holds every partition in memory at once, and its worker
    pools must not fork a rank that has a process group running."""
    parent = os.path.dirname(dst)
    prefix = f".{os.path.basename(dst)}.tmp."
    for stale in glob.glob(os.path.join(parent, prefix + "*")):  # of a conversion that crashed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = os.path.join(parent, f"{prefix}{os.getpid()}")
    cmd = [
        sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", src,
        "--output_folder", tmp, "--num_extract_workers", str(workers),
        "--num_merge_workers", str(max(1, workers // 2)),
        # Our model does not register UNIVERSAL_CHECKPOINT_INFO (no tensor/pipeline parallelism to describe).
        "--inject_missing_state",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(
            f"checkpoint: converting {src} to a universal checkpoint failed (exit {proc.returncode}); "
            f"{src} is unchanged:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        )
    _alias_model_states(tmp)
    _fsync_tree(tmp)
    os.rename(tmp, dst)
    # ds_to_universal points `latest_universal` next to its output at the temporary name; name the real one.
    from pvt_dist.engine.checkpoint import atomic_write_text

    atomic_write_text(os.path.join(parent, "latest_universal"), os.path.basename(dst))


def _alias_model_states(folder: str) -> None:
    """Give the client-state file both names a universal load looks for: ZeRO-1/2 engines read
    ``mp_rank_00_model_states.pt``, ZeRO-3 engines ``zero_pp_rank_0_mp_rank_00_model_states.pt``, and the
    converter copies only the source stage's. (The weights themselves come from ``zero/``.)"""
    plain = os.path.join(folder, "mp_rank_00_model_states.pt")
    zero3 = os.path.join(folder, "zero_pp_rank_0_mp_rank_00_model_states.pt")
    if os.path.isfile(plain) and not os.path.exists(zero3):
        shutil.copy2(plain, zero3)
    elif os.path.isfile(zero3) and not os.path.exists(plain):
        shutil.copy2(zero3, plain)


def ensure_universal(ckpt_dir: str, tag: str, rank: int, source: str, target: str) -> str:
    """Collective: the universal tag of ``tag`` (converted by rank 0 if it does not exist yet).

    ``source`` / ``target`` describe the two runs for the log ("2 ranks, ZeRO-2").
    """
    utag = universal_tag(tag)
    dst = os.path.join(ckpt_dir, utag)
    verdict: tuple[str | None, float | None] = (None, None)
    if rank == 0:
        try:
            if os.path.isdir(dst):
                log.info("elastic resume: %s -> %s, reusing universal checkpoint %s", source, target, dst)
            else:
                t0 = time.perf_counter()
                _convert(os.path.join(ckpt_dir, tag), dst, max(1, min(8, pdist.cpu_budget())))
                seconds = time.perf_counter() - t0
                log.info(
                    "elastic resume: %s -> %s, converted %s to universal checkpoint %s in %.1f s",
                    source, target, tag, dst, seconds,
                )  # fmt: skip
                verdict = (None, seconds)
        except Exception as e:  # noqa: BLE001 - every rank must fail together, with rank 0's reason
            verdict = (f"{type(e).__name__}: {e}", None)
    error, _ = pdist.broadcast_object(verdict)
    if error is not None:
        raise RuntimeError(error)
    return utag
