"""Preemption and time-limit handling: agree on a stop across ranks, checkpoint, requeue.

The contract with the trainer (pvt_dist/engine/)::

    handler = PreemptionHandler()             # main thread, before the training loop
    for step in ...:
        if (step % sync_every == 0 or handler.check_due(step)) and handler.stop_requested(step):
            # EVERY rank, at the same step boundaries (collective); check_due: every check_every_s
            save_checkpoint(...)              # collective; `latest` updated atomically
            flush TensorBoard / logs
            handler.on_checkpoint_saved()     # may not return on rank 0 under submitit (see below)
            return 0                          # exit code 0: the job is requeued, not failed
        train_step(...)

How a stop flows under ``sbatch slurm/pretrain.sh``:

1. Slurm signals the batch shell: ``--signal=B:USR1@120`` (120 s before the time limit), or SIGTERM on
   preemption/cancel. The batch script traps it and forwards it to ``srun``, which signals every task.
   A signal sent to only some ranks (``scancel --signal=USR1 JOB.STEP``, a node-local event) works too.
   Tasks start with USR1 ignored and the script repeats it until the step ends, so a signal that arrives
   before this handler exists is not lost and does not kill the task (slurm/srun_train.sh).
2. The handler only sets a local flag: nothing else is safe at an arbitrary point of a training step.
3. ``stop_requested()`` all-reduces the flag with MAX over the default process group, so every rank stops
   after the same optimizer step, even when the signal reached ranks in different steps or only one rank.
   It runs at the loop's host syncs and, by time, at least every ``check_every_s`` seconds: the same
   all-reduce carries the slowest rank's time since the previous agreement, so every rank derives the same
   next step to agree at (``check_due``), without a clock that ranks would have to share.
4. The trainer saves a checkpoint collectively and calls ``on_checkpoint_saved()``: a barrier (every rank
   has finished writing), then rank 0 runs ``scontrol requeue $SLURM_JOB_ID``. Slurm ends this run and starts
   the same job id again (``SLURM_RESTART_COUNT`` + 1, same log file); the trainer resumes from ``latest``
   with no lost or repeated optimizer step. A failed requeue (the job was cancelled, or is interactive) is
   logged, not raised: the checkpoint is there and rerunning the command resumes it. A stop that any rank
   got as SIGTERM (``scancel`` without ``--signal``, the time limit without a grace signal, preemption) is
   saved the same way but never requeued: Slurm is ending the job, and a requeue would undo a cancel.

Under submitit (``launch/submit.py``, ``SUBMITIT_EXECUTOR=slurm``) the job is submitted with
``--signal=USR2@<delay>`` and submitit installs its own handlers before our code runs: SIGUSR2 ->
``checkpoint_and_try_requeue`` (which, on global rank 0, calls the Checkpointable's ``checkpoint()``, pickles
the returned resubmission, runs ``scontrol requeue`` and ``sys.exit(-1)``) and SIGTERM -> log only. Left
alone, that handler would fire in the middle of a training step with no model checkpoint. So here
submitit's signal (``SUBMITIT_PREEMPT_SIGNAL``, default USR2) is added to the watched signals, and the
handler it displaced is kept: ``on_checkpoint_saved()`` calls it on rank 0 only once our checkpoint is on
disk, and submitit then does what it always does (timeout accounting, resubmission, requeue, exit). Rank 0
therefore leaves ``on_checkpoint_saved()`` through ``SystemExit``; the trainer must let it propagate.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from types import FrameType

import torch
import torch.distributed as dist

from pvt_dist.cluster.lease import slurm_job_id

logger = logging.getLogger(__name__)

DEFAULT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

# Set once this process asked Slurm (directly or through submitit) to requeue the job: the run is not
# finished, so launchers must not report success (see pvt_dist/cluster/submitit_job.py).
_requeue_requested = False


def requeue_requested() -> bool:
    """True once ``on_checkpoint_saved()`` handed the job to Slurm for a requeue in this process."""
    return _requeue_requested


def running_under_submitit() -> bool:
    """True inside a job started by submitit's Slurm executor (its sbatch script exports this)."""
    return os.environ.get("SUBMITIT_EXECUTOR") == "slurm"


def _submitit_signal() -> signal.Signals:
    name = "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    sig = getattr(signal, name, None)
    if sig is None:
        raise ValueError(f"SUBMITIT_PREEMPT_SIGNAL: unknown signal {name!r}")
    return sig


def _rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class PreemptionHandler:
    """Turns preemption/timeout signals into a stop that all ranks agree on at a step boundary.

    Args:
        signals: signals that request a stop. Under submitit its preemption signal (USR2 unless
            ``SUBMITIT_PREEMPT_SIGNAL`` says otherwise) is added.
        check_every_s: the longest wall-clock time between two agreements (``preemption.check_every_s``),
            used by :meth:`check_due`.
    """

    def __init__(self, signals: Iterable[int] = DEFAULT_SIGNALS, check_every_s: float = 5.0) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionHandler must be created in the main thread (signal handlers)")
        self.submitit = running_under_submitit()
        sigs = [signal.Signals(s) for s in signals]
        if self.submitit and _submitit_signal() not in sigs:
            sigs.append(_submitit_signal())
        self.signals = tuple(sigs)
        self._received: signal.Signals | None = None
        self._terminated = False  # this process got SIGTERM (scancel, Slurm preemption, time limit)
        self._stop = False
        self._agreed_terminated = False  # any rank got SIGTERM, agreed at the stop
        self.check_every_s = check_every_s
        self._last_check: tuple[int, float] | None = None  # (step, time.monotonic()) of the last agreement
        self._next_check = 0
        self._finished = False
        self._previous: dict[signal.Signals, Callable | int | None] = {}
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag: the signal may land anywhere inside a forward/backward or a collective.
        if self._received is None:
            self._received = signal.Signals(signum)
        if signum == signal.SIGTERM:
            self._terminated = True

    @property
    def received(self) -> signal.Signals | None:
        """The first stop signal this process received (local knowledge, not agreed)."""
        return self._received

    def request_stop(self) -> None:
        """Ask for a stop from code (e.g. a wall-clock budget) exactly as a signal would."""
        if self._received is None:
            self._received = signal.SIGUSR1

    def check_due(self, step: int) -> bool:
        """True at the steps where, by time, the ranks must agree on the stop flag (the same on every rank).

        The next due step is derived at each agreement from the all-reduced (MAX) time the steps since the
        previous one took, so every rank computes the same step: about ``check_every_s`` seconds of steps
        later, at least the next step. No agreement yet: due now.
        """
        return step >= self._next_check

    def stop_requested(self, step: int | None = None) -> bool:
        """Collective: True on every rank iff any rank has received a stop signal.

        Must be called by all ranks of the default process group at the same step boundaries; costs one
        all-reduce of a 2-element tensor (on the current CUDA device under NCCL, on CPU under gloo). Once
        True it stays True. Without an initialised process group it is the local flag. With ``step``, the
        same all-reduce carries the slowest rank's time since the previous agreement, from which
        :meth:`check_due` schedules the next one.
        """
        if self._stop:
            return True
        flag = self._received is not None
        now = time.monotonic()
        elapsed = 0.0 if self._last_check is None else now - self._last_check[1]
        if _distributed():
            device = torch.device("cpu")
            if dist.get_backend() == "nccl":
                device = torch.device("cuda", torch.cuda.current_device())
            t = torch.tensor(
                [float(flag), elapsed, float(self._terminated)], dtype=torch.float64, device=device
            )
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag, elapsed, terminated = bool(t[0].item()), float(t[1].item()), bool(t[2].item())
        else:
            terminated = self._terminated
        if step is not None:
            self._schedule(step, elapsed)
            self._last_check = (step, time.monotonic())
        if flag:
            self._stop = True
            self._agreed_terminated = terminated
            how = self._received.name if self._received is not None else "another rank"
            logger.warning("rank %d: stop requested (%s); checkpointing at this step boundary", _rank(), how)
        return flag

    def _schedule(self, step: int, elapsed: float) -> None:
        # Identical on every rank: a function of the step and the all-reduced elapsed time only.
        if self._last_check is None or step <= self._last_check[0] or elapsed <= 0:
            self._next_check = step + 1
            return
        per_step = elapsed / (step - self._last_check[0])
        self._next_check = step + max(1, int(self.check_every_s / per_step))

    def run_finished(self) -> None:
        """Call on every rank once the last optimizer step is done: the run is complete, not preempted.

        A stop signal from now on (the time limit during the final validation or the final save) is only
        logged; nothing requeues the job. ``close()`` then ignores the watched signals instead of
        restoring the handlers it displaced, because submitit's would requeue a finished run (it checkpoints
        and runs ``scontrol requeue`` on USR2) if the signal came in the last seconds before exit.
        """
        self._finished = True
        if self._received is not None:
            logger.warning("rank %d: %s arrived after the last step; the run is complete, no requeue",
                           _rank(), self._received.name)  # fmt: skip

    def on_checkpoint_saved(self) -> None:
        """Call on every rank after the stop checkpoint is complete; requeues the job when under Slurm.

        Under sbatch rank 0 runs ``scontrol requeue``; under submitit rank 0 hands over to submitit's
        handler, which requeues and raises ``SystemExit`` (see the module docstring). Elsewhere it only logs:
        rerunning the same command resumes from the checkpoint. A stop that any rank got as SIGTERM never
        requeues: that is Slurm ending the job (a ``scancel`` would otherwise be undone).
        """
        global _requeue_requested
        if _distributed():
            dist.barrier()  # requeueing kills the job: nobody may still be writing the checkpoint
        if self._agreed_terminated:
            # SIGTERM is Slurm ending the job: `scancel` without --signal, the time limit without a
            # --signal grace, or preemption (PreemptMode=REQUEUE requeues by itself). Requeueing would
            # undo a cancel, so only the configured grace signals (USR1; submitit's USR2) requeue.
            if _rank() == 0:
                logger.warning(
                    "stopped by SIGTERM (scancel, time limit or preemption): the job is not requeued; "
                    "resubmit to resume from the checkpoint"
                )
            return
        if self.submitit or slurm_job_id() is not None:
            _requeue_requested = True
        if self.submitit:
            self._submitit_requeue()
        elif slurm_job_id() is not None:
            if _rank() == 0:
                self._scontrol_requeue(slurm_job_id())
        else:
            logger.warning("not running under Slurm: checkpoint saved, rerun the same command to resume")

    def _scontrol_requeue(self, job_id: str) -> None:
        restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
        logger.warning("requeueing Slurm job %s (restart count so far: %s)", job_id, restarts)
        try:
            proc = subprocess.run(
                ["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            logger.error("scontrol requeue %s failed: %s; resubmit to resume from the checkpoint", job_id, e)
            return
        if proc.returncode != 0:
            # e.g. the job was cancelled (SIGTERM from scancel) or is not a batch job.
            logger.error(
                "scontrol requeue %s failed (exit %d): %s; resubmit to resume from the checkpoint",
                job_id,
                proc.returncode,
                proc.stderr.strip(),
            )

    def _submitit_requeue(self) -> None:
        from submitit.core.job_environment import SignalHandler

        sig = _submitit_signal()
        previous = self._previous.get(sig)
        owner = getattr(previous, "__self__", None)
        if not isinstance(owner, SignalHandler):
            logger.error("submitit's signal handler was not installed; the job will not be requeued")
            return
        # submitit's handler returns at once on ranks != 0; on rank 0 it calls checkpoint(), requeues and
        # exits. A failed `scontrol requeue` (cancelled job) surfaces as CalledProcessError: log it.
        try:
            previous(sig, None)
        except subprocess.CalledProcessError as e:
            logger.error("submitit could not requeue the job (%s); resubmit to resume", e)

    def close(self) -> None:
        """Restore the handlers that were installed before this one; after ``run_finished()`` the stop
        signals are ignored instead (SIGTERM keeps its previous action: a cancel still ends the process)."""
        for sig, prev in self._previous.items():
            if self._finished and sig != signal.SIGTERM:
                prev = signal.SIG_IGN
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> PreemptionHandler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
