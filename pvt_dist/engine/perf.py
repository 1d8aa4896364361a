"""What a user watches while training: model FLOPs utilisation, step-phase timings, profiler traces.

- ``model_flops_per_image``: FLOPs of one training image (forward + backward = 3 x forward, the usual
  MFU convention; recomputation under gradient checkpointing is not counted), counted once at start with
  ``torch.utils.flop_counter.FlopCounterMode`` on one sample.
- ``measured_peak_tflops``: when ``logging.peak_tflops`` is unset, a short timed matmul in the dtype the
  training GEMMs run in (bf16 on GPU). It is an achievable peak, above what a datasheet-relative MFU
  would say; set ``logging.peak_tflops`` (989 for H100/H200 dense bf16) for the conventional figure.
- ``PhaseTimer``: seconds spent in named phases of a step. On GPU it records CUDA events (the host only
  queues work, so wall clocks would measure launches) and reads them back at log time, after the
  loop's sync; on CPU it reads the wall clock.
- ``StepProfiler``: ``logging.profile_steps: [a, b]`` traces optimizer steps a..b with torch.profiler
  into ``RUN_DIR/profile/`` (Chrome / TensorBoard format, one file per rank), plus a CUDA memory snapshot
  (``memory_snapshot_rank{r}.pickle``, viewable at pytorch.org/memory_viz) on GPU.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

import torch

log = logging.getLogger("pvt_dist.train")


def model_flops_per_image(model: torch.nn.Module, *inputs: torch.Tensor) -> float:
    """Training FLOPs of one image: 3 x the forward FLOPs of ``model(*inputs)`` (inputs of batch 1)."""
    from pvt_dist.models.summary import forward_flops

    return 3.0 * forward_flops(model, *inputs)


def measured_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """TFLOP/s of a square matmul in ``dtype`` on ``device``: ~0.1-0.5 s on a GPU or a CPU core pair."""
    n, trials, reps = (8192, 5, 5) if device.type == "cuda" else (1024, 6, 1)
    gen = torch.Generator(device=device).manual_seed(0)  # leave the global RNG streams untouched
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    a @ b  # warm-up (kernel selection, first-touch)
    best = float("inf")
    for _ in range(trials):  # best of a few: on a shared machine the least disturbed trial is the peak
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - t0) / reps)
    return 2.0 * n**3 / best / 1e12


class PhaseTimer:
    """``with timer.phase("fwd_bwd"): ...`` accumulates that phase's seconds until ``collect()``."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._wall: dict[str, float] = {}
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    def phase(self, name: str):
        return _Phase(self, name)

    def collect(self) -> dict[str, float]:
        """Seconds per phase since the last collect (reads CUDA events: call after a host sync)."""
        out = dict(self._wall)
        for name, start, end in self._events:
            end.synchronize()
            out[name] = out.get(name, 0.0) + start.elapsed_time(end) / 1000.0
        self._wall.clear()
        self._events.clear()
        return out


class _Phase:
    def __init__(self, timer: PhaseTimer, name: str):
        self.timer, self.name = timer, name

    def __enter__(self):
        if self.timer.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        t = self.timer
        if t.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            t._events.append((self.name, self.start, end))
        else:
            t._wall[self.name] = t._wall.get(self.name, 0.0) + time.perf_counter() - self.t0
        return False


class StepProfiler:
    """Profiles optimizer steps ``first..last`` (1-based, inclusive); a no-op when ``steps`` is None."""

    def __init__(self, steps: list[int] | None, run_dir: str, rank: int, device: torch.device):
        self.first, self.last = (steps[0], steps[1]) if steps else (None, None)
        self.dir = os.path.join(run_dir, "profile")
        self.rank, self.device = rank, device
        self.prof = None

    def before_step(self, step: int) -> None:
        """Called with the number of the step about to run."""
        if self.first is None or self.prof is not None or not self.first <= step <= self.last:
            return
        from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler

        os.makedirs(self.dir, exist_ok=True)
        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        self.prof = profile(
            activities=activities,
            on_trace_ready=tensorboard_trace_handler(self.dir, worker_name=f"rank{self.rank}"),
            record_shapes=True,
            profile_memory=True,
        )
        self.prof.start()
        log.info("profiling steps %d-%d into %s", step, self.last, self.dir)

    def region(self, step: int):
        """Context naming the step ``train_step {step}`` in the trace (nothing when not profiling)."""
        if self.prof is None:
            return contextlib.nullcontext()
        return torch.profiler.record_function(f"train_step {step}")

    def after_step(self, step: int) -> None:
        """Called with the number of the step that just ran."""
        if self.prof is not None:
            self.prof.step()
            if step >= self.last:
                self.stop()

    def stop(self) -> None:
        """Write the trace (and the memory snapshot on GPU); safe to call when not profiling."""
        if self.prof is None:
            return
        prof, self.prof = self.prof, None
        prof.stop()  # on_trace_ready writes the .pt.trace.json
        if self.device.type == "cuda":
            path = os.path.join(self.dir, f"memory_snapshot_rank{self.rank}.pickle")
            torch.cuda.memory._dump_snapshot(path)
            torch.cuda.memory._record_memory_history(enabled=None)
            log.info("CUDA memory snapshot: %s", path)
