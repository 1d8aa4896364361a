"""Progress reporting from rank 0: console lines with ETA, TensorBoard scalars and ``metrics.jsonl``.

TensorBoard events go to ``RUN_DIR/tensorboard``; a resumed run appends to the same directory and
purges events past the resumed step, so the curves stay continuous with no duplicated steps.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import time
import warnings

import torch

log = logging.getLogger("pvt_dist.train")


def memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def setup_logging(rank: int, deepspeed_level: str = "warning") -> None:
    """Rank 0 logs progress; the other ranks print only errors."""
    level = logging.INFO if rank == 0 else logging.ERROR
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    # torch.distributed deprecation notices from inside DeepSpeed, once per collective call site.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    ds_level = getattr(logging, deepspeed_level.upper()) if rank == 0 else logging.ERROR
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(ds_level)
    try:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(ds_level)
    except ImportError:  # pragma: no cover - deepspeed is a hard dependency
        pass


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


class MetricLogger:
    """No-op on ranks other than 0."""

    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool, start_step: int, total_steps: int):
        self.enabled = enabled
        self.total_steps = total_steps
        self.start_step = start_step
        self.t_start = time.perf_counter()
        self.writer = None
        self.metrics_path = os.path.join(run_dir, "metrics.jsonl")
        self.tb_dir = os.path.join(run_dir, "tensorboard")
        if not enabled:
            return
        if start_step > 0:
            self._truncate_metrics(start_step)
            self._truncate_events(start_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # Everything up to start_step was logged before that checkpoint was saved; what an interrupted
            # run wrote after it is cut from its event files (above) and purge_step tells TensorBoard too.
            self.writer = SummaryWriter(self.tb_dir, purge_step=start_step + 1 if start_step > 0 else None)

    def _truncate_metrics(self, start_step: int) -> None:
        """Drop lines for steps after ``start_step`` left by an interrupted run (they will be redone)."""
        if not os.path.isfile(self.metrics_path):
            return
        with open(self.metrics_path) as f:
            lines = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= start_step]
        tmp = self.metrics_path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(lines)
        os.replace(tmp, self.metrics_path)

    def _truncate_events(self, start_step: int) -> None:
        """Drop events after ``start_step`` from the event files of earlier runs, so no step is in the
        files twice (TensorBoard's purge hides them, but other readers of the raw events see them)."""
        if not os.path.isdir(self.tb_dir):
            return
        from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
        from tensorboard.compat.proto import event_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter

        for name in sorted(os.listdir(self.tb_dir)):
            path = os.path.join(self.tb_dir, name)
            if "tfevents" not in name or not os.path.isfile(path):
                continue
            records = list(RawEventFileLoader(path).Load())
            keep = [r for r in records if event_pb2.Event.FromString(r).step <= start_step]
            if len(keep) == len(records):
                continue
            tmp = f"{path}.tmp{os.getpid()}"
            with open(tmp, "wb") as f:
                writer = RecordWriter(f)
                for record in keep:
                    writer.write(record)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)

    def hparams(self, hparams: dict, metric_names: list[str]) -> None:
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams as hp_summary

        flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
        exp, ssi, sei = hp_summary(flat, {m: 0.0 for m in metric_names})
        fw = self.writer._get_file_writer()
        for summary in (exp, ssi, sei):
            fw.add_summary(summary)

    def text(self, tag: str, text: str) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, f"```\n{text}\n```", 0)

    def scalars(self, step: int, values: dict[str, float], kind: str) -> None:
        """Record ``values`` (names like ``train/loss``) at ``step`` in TensorBoard and metrics.jsonl."""
        if not self.enabled:
            return
        if self.writer is not None:
            for k, v in values.items():
                if v is not None:
                    self.writer.add_scalar(k, v, step)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"step": step, "kind": kind, **values}) + "\n")

    def console(self, step: int, epoch: float, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        done = step - self.start_step
        elapsed = time.perf_counter() - self.t_start
        eta = elapsed / max(done, 1) * (self.total_steps - step)
        parts = " ".join(f"{k.split('/')[-1]} {v:.4g}" for k, v in values.items() if v is not None)
        log.info("step %d/%d ep %.2f | %s | eta %s", step, self.total_steps, epoch, parts, _fmt_eta(eta))

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
