"""Preemption and time-limit handling: agree on a stop across ranks, checkpoint, requeue.

The contract with the trainer (pvt_dist/engine/)::

    handler = PreemptionHandler()             # main thread, before the training loop
    for step in ...:
        if handler.stop_requested():          # EVERY rank, at the same step boundaries (collective)
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
4. The trainer saves a checkpoint collectively and calls ``on_checkpoint_saved()``: a barrier (every rank
   has finished writing), then rank 0 runs ``scontrol requeue $SLURM_JOB_ID``. Slurm ends this run and starts
   the same job id again (``SLURM_RESTART_COUNT`` + 1, same log file); the trainer resumes from ``latest``
   with no lost or repeated optimizer step. A failed requeue (the job was cancelled, or is interactive) is
   logged, not raised: the checkpoint is there and rerunning the command resumes it.

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
from collections.abc import Callable, Iterable
from types import FrameType

import torch
import torch.distributed as dist

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


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` expects: ``ARRAYID_TASKID`` for array jobs, else ``SLURM_JOB_ID``."""
    array_id, task_id = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_id and task_id:
        return f"{array_id}_{task_id}"
    return os.environ.get("SLURM_JOB_ID")


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
    """

    def __init__(self, signals: Iterable[int] = DEFAULT_SIGNALS) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionHandler must be created in the main thread (signal handlers)")
        self.submitit = running_under_submitit()
        sigs = [signal.Signals(s) for s in signals]
        if self.submitit and _submitit_signal() not in sigs:
            sigs.append(_submitit_signal())
        self.signals = tuple(sigs)
        self._received: signal.Signals | None = None
        self._stop = False
        self._finished = False
        self._previous: dict[signal.Signals, Callable | int | None] = {}
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag: the signal may land anywhere inside a forward/backward or a collective.
        if self._received is None:
            self._received = signal.Signals(signum)

    @property
    def received(self) -> signal.Signals | None:
        """The first stop signal this process received (local knowledge, not agreed)."""
        return self._received

    def request_stop(self) -> None:
        """Ask for a stop from code (e.g. a wall-clock budget) exactly as a signal would."""
        if self._received is None:
            self._received = signal.SIGUSR1

    def stop_requested(self) -> bool:
        """Collective: True on every rank iff any rank has received a stop signal.

        Must be called by all ranks of the default process group at the same step boundaries; costs one
        all-reduce of a 1-element tensor (on the current CUDA device under NCCL, on CPU under gloo). Once
        True it stays True. Without an initialised process group it is the local flag.
        """
        if self._stop:
            return True
        flag = self._received is not None
        if _distributed():
            device = torch.device("cpu")
            if dist.get_backend() == "nccl":
                device = torch.device("cuda", torch.cuda.current_device())
            t = torch.tensor([int(flag)], dtype=torch.int32, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        if flag:
            self._stop = True
            how = self._received.name if self._received is not None else "another rank"
            logger.warning("rank %d: stop requested (%s); checkpointing at this step boundary", _rank(), how)
        return flag

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
        rerunning the same command resumes from the checkpoint.
        """
        global _requeue_requested
        if _distributed():
            dist.barrier()  # requeueing kills the job: nobody may still be writing the checkpoint
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
