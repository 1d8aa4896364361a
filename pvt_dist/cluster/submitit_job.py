"""Submit training to Slurm through submitit, as a Checkpointable job that survives preemption and timeouts.

``launch/submit.py`` is the command line; this module holds the job and the executor setup.

Each Slurm task unpickles :class:`TrainJob` and runs ``launch/train.py`` *in-process* (not as a child
process), so that the signals Slurm sends to the task reach the trainer's
:class:`~pvt_dist.cluster.preemption.PreemptionHandler`. How a preemption/timeout then flows:

1. Slurm sends ``SIGUSR2`` to every task ``slurm_signal_delay_s`` seconds before the time limit (submitit
   submits with ``--signal=USR2@<delay>``); preemption sends ``SIGTERM`` (and the test helper
   ``job._interrupt()`` sends ``SIGTERM`` then ``SIGUSR2``).
2. The PreemptionHandler (installed after submitit's own handlers) sets its flag; the ranks agree at the
   next step boundary, save a checkpoint collectively and call ``on_checkpoint_saved()``.
3. ``on_checkpoint_saved()`` hands over to submitit's handler on global rank 0: it calls
   :meth:`TrainJob.checkpoint` (a resubmission of the same job, since the state is in the run dir),
   pickles it, runs ``scontrol requeue`` and exits. The requeued job runs ``launch/train.py`` again with the
   same arguments and the engine resumes from the run dir's ``latest`` checkpoint.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import time
from pathlib import Path

import submitit

from pvt_dist.cluster import preemption
from pvt_dist.cluster.distributed import set_thread_budget

REPO_ROOT = Path(__file__).resolve().parents[2]


def master_port(job_id: str, restart_count: int) -> int:
    """Rendezvous port derived from the job (same on every task), shifted per requeue like slurm/*.sh."""
    return 20000 + (int(job_id.split("_")[0]) * 8 + restart_count) % 40000


class TrainJob(submitit.helpers.Checkpointable):
    """One training run: ``SCRIPT --config CONFIG OVERRIDES...`` on every task of the job.

    Args:
        config: path of the YAML config (absolute, so the job does not depend on its working dir).
        overrides: dotted ``key=value`` overrides, passed through unchanged.
        workdir: working directory of the run (relative paths in the config are resolved from it).
        script: the training entry point, ``launch/train.py`` of this repository by default.
    """

    def __init__(self, config: str, overrides: list[str], workdir: str, script: str | None = None) -> None:
        self.config = config
        self.overrides = list(overrides)
        self.workdir = workdir
        self.script = script or str(REPO_ROOT / "launch" / "train.py")

    def argv(self) -> list[str]:
        return ["--config", self.config, *self.overrides]

    def __call__(self) -> None:
        env = submitit.JobEnvironment()
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        os.environ["MASTER_PORT"] = str(master_port(env.job_id, restarts))
        # RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR for pvt_dist.cluster.distributed; keep every GPU of the node
        # visible because the engine selects its device from LOCAL_RANK.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        # torch is already imported here (this module is unpickled by submitit): OMP_NUM_THREADS comes from
        # the sbatch script's setup lines (build_executor); set_thread_budget() resizes torch's pool anyway.
        set_thread_budget()
        os.chdir(self.workdir)
        print(f"{env} restart {restarts}: {self.script} {' '.join(self.argv())}", flush=True)
        sys.argv = [self.script, *self.argv()]
        try:
            runpy.run_path(self.script, run_name="__main__")
        except SystemExit as e:
            # A clean exit (e.g. after a stop checkpoint on ranks != 0) is a normal return for submitit.
            # Anything else must propagate unchanged: rank 0 leaves through submitit's own
            # sys.exit(-1) after requeueing, and must not be turned into an "error" result.
            if e.code not in (0, None):
                raise
        if preemption.requeue_requested():
            # Stopped for a requeue: leave without a result pickle (SystemExit passes through submitit),
            # else this task would already look finished to job.results() while the run goes on.
            raise SystemExit(0)

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on rank 0 after the trainer saved its checkpoint: resubmit the same run.

        The model/optimizer/data state is in the run dir, not in this object, so the resubmission only
        needs the same arguments; the engine resumes from ``latest``.
        """
        return submitit.helpers.DelayedSubmission(
            TrainJob(self.config, self.overrides, self.workdir, self.script)
        )


def build_executor(args: argparse.Namespace) -> submitit.AutoExecutor:
    """AutoExecutor for ``args`` (Slurm when sbatch is available) with one task per GPU."""
    folder = Path(args.folder) if args.folder else default_folder(args.config)
    executor = submitit.AutoExecutor(
        folder=folder, cluster=args.cluster, slurm_max_num_timeout=args.max_num_timeout
    )
    tasks = args.tasks_per_node or max(args.gpus_per_node, 1)
    params = dict(
        name=args.job_name,
        nodes=args.nodes,
        tasks_per_node=tasks,
        gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task,
        timeout_min=args.timeout_min,
        slurm_signal_delay_s=args.signal_delay_s,
        slurm_additional_parameters={"requeue": True},
        # Thread counts before any Python starts (torch, OpenMP/MKL and DALI size their pools at start): one
        # intra-op thread per allotted core, not one per core of the node for every rank.
        slurm_setup=[
            f"export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-{args.cpus_per_task}}}",
            f"export MKL_NUM_THREADS=${{MKL_NUM_THREADS:-{args.cpus_per_task}}}",
        ],
        # Slurm 22.05's srun does not inherit the allocation's --cpus-per-task.
        slurm_srun_args=[f"--cpus-per-task={args.cpus_per_task}", "--kill-on-bad-exit=1"],
    )
    if args.partition:
        params["slurm_partition"] = args.partition
    executor.update_parameters(**params)
    return executor


def default_folder(config: str) -> Path:
    """A fresh folder per submission: job ids restart at 1 on a new cluster and must not meet old pickles."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return REPO_ROOT / "runs" / "submitit" / f"{stamp}-{Path(config).stem}-{os.getpid()}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Submit launch/train.py to Slurm with submitit (checkpointable, requeued on preemption).",
    )
    p.add_argument("--config", required=True, help="YAML config passed to launch/train.py")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (0: CPU with gloo)")
    p.add_argument("--tasks-per-node", type=int, default=0, help="processes per node (default: GPUs, min 1)")
    p.add_argument("--cpus-per-task", type=int, default=10, help="CPUs per process (data loading threads)")
    p.add_argument("--partition", default=None, help="Slurm partition (default: the cluster's default)")
    p.add_argument("--timeout-min", type=int, default=24 * 60, help="time limit of each run, minutes")
    p.add_argument("--signal-delay-s", type=int, default=120, help="USR2 this long before the time limit")
    p.add_argument(
        "--max-num-timeout", type=int, default=20, help="requeues after a timeout before giving up"
    )
    p.add_argument("--script", default="launch/train.py", help="training entry point")
    p.add_argument("--job-name", default="pvt-submitit", help="Slurm job name")
    p.add_argument(
        "--folder", default=None, help="submitit folder (default: a fresh runs/submitit/<stamp>-...)"
    )
    p.add_argument("--cluster", default=None, help="force a submitit cluster: slurm, local, debug")
    p.add_argument("--wait", action="store_true", help="block until the job ends; exit 1 unless it succeeded")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. optim.lr=1e-3")
    args = p.parse_args(argv)
    for name in ("nodes", "timeout_min", "cpus_per_task"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.gpus_per_node < 0 or args.tasks_per_node < 0:
        p.error("--gpus-per-node and --tasks-per-node must be >= 0")
    if not Path(args.config).is_file():
        p.error(f"--config: {args.config}: no such file")
    if not Path(args.script).is_file() and not (REPO_ROOT / args.script).is_file():
        p.error(f"--script: {args.script}: no such file")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    executor = build_executor(args)
    script = Path(args.script) if Path(args.script).is_file() else REPO_ROOT / args.script
    job = executor.submit(
        TrainJob(str(Path(args.config).resolve()), args.overrides, os.getcwd(), str(script.resolve()))
    )
    print(f"submitted job {job.job_id}; logs: {job.paths.stdout} {job.paths.stderr}", flush=True)
    if not args.wait:
        return 0
    try:
        job.results()  # one result per task; waits through requeues
    except Exception as e:  # submitit re-raises the remote failure with its log
        print(f"job {job.job_id} failed ({job.state}):\n{e}", file=sys.stderr)
        return 1
    # Result pickles appear before the processes have exited: report Slurm's final state.
    state = job.watcher.get_state(job.job_id, mode="force")
    deadline = time.time() + 300
    while state.upper() in ("RUNNING", "COMPLETING", "PENDING", "REQUEUED") and time.time() < deadline:
        time.sleep(2)
        state = job.watcher.get_state(job.job_id, mode="force")
    print(f"job {job.job_id} finished: {state}")
    return 0 if state.upper() == "COMPLETED" else 1
