"""One job per run directory: a lease file with a heartbeat, taken before any process group starts.

``RUN_DIR/.lease`` is a small JSON record of its holder: host, pid, Slurm job id and restart count, start
time, a random token, the heartbeat interval and the time of the last heartbeat. A daemon thread of the
holder rewrites the heartbeat every ``heartbeat_s`` seconds; the holder also keeps an ``flock`` on the file
(exclusive), so a live holder on the same host is recognised even across pid namespaces.

Acquisition is atomic on local filesystems and NFS alike: the record is written to a file of its own and
``os.link``-ed to ``.lease`` (``link`` fails with EEXIST when the lease exists; it is atomic on NFS, unlike
``O_EXCL`` on old clients; a lost NFS reply is caught by checking the link count). When ``.lease`` exists,
its holder is judged:

- **dead, taken over with a warning**: same host and its pid is gone (and its flock is free); or its
  heartbeat is older than ``stale_after`` x its own interval (a holder on another node that died or lost
  the filesystem; clocks of the nodes must agree to well under that, as NTP gives); or it is the same
  Slurm job with a lower ``SLURM_RESTART_COUNT`` (a requeued job takes over its own hold: Slurm has ended the
  previous incarnation's processes before the restart begins); or it is another Slurm job that
  ``scontrol show job`` reports ended (or no longer knows), e.g. a job whose rank 0 was SIGKILLed.
- **alive**: the launch is refused, :class:`LeaseHeldError` names the holder; the entry point exits 2.

A takeover happens under a second link-created lock (``.lease.takeover``): the taker re-reads the lease,
and only if it still holds the record judged dead replaces it with its own (``os.replace``, so the lease
file never disappears and no plain acquisition slips in between). Racing takers thus end with exactly one
holder; the others see its fresh record and are refused.

Only global rank 0 takes the lease (see ``pvt_dist/entrypoint.py`` for why the other ranks need not).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import asdict, dataclass

try:
    import fcntl
except ImportError:  # not POSIX: the heartbeat alone decides
    fcntl = None

log = logging.getLogger(__name__)

LEASE_FILE = ".lease"
RECORD_SIZE = 1024  # heartbeats rewrite the record in place, padded to this size (one write)
TAKEOVER_LOCK_S = 30.0  # a takeover lock older than this was left by a taker that died


class LeaseHeldError(RuntimeError):
    """The run directory is held by another live job."""


@dataclass
class Holder:
    host: str
    pid: int
    job_id: str | None
    """Slurm job id (``ARRAY_TASK`` form for array jobs); None outside Slurm."""
    restart_count: int
    """``SLURM_RESTART_COUNT`` of the holding run (0 for the first run of a job)."""
    started: float
    heartbeat: float
    heartbeat_s: float
    stale_after: float
    token: str

    def describe(self) -> str:
        job = f"Slurm job {self.job_id} (restart {self.restart_count})" if self.job_id else "no Slurm job"
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        age = time.time() - self.heartbeat
        return f"host {self.host}, pid {self.pid}, {job}, started {started}, last heartbeat {age:.0f} s ago"


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` expects: ``ARRAYID_TASKID`` for array jobs, else ``SLURM_JOB_ID``."""
    array_id, task_id = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_id and task_id:
        return f"{array_id}_{task_id}"
    return os.environ.get("SLURM_JOB_ID")


def this_job() -> tuple[str | None, int]:
    """(Slurm job id, restart count) of this process, (None, 0) outside Slurm."""
    return slurm_job_id(), int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read(path: str) -> Holder | None:
    """The record at ``path``; None if the file is gone. Retries a read that overlaps a heartbeat."""
    for attempt in range(5):
        try:
            with open(path) as f:
                text = f.read()
        except FileNotFoundError:
            return None
        try:
            return Holder(**json.loads(text))
        except (ValueError, TypeError):
            if attempt == 4:
                raise RuntimeError(f"{path}: not a lease record ({text[:80]!r}); remove it by hand") from None
            time.sleep(0.05)
    return None


def _encode(holder: Holder) -> bytes:
    data = json.dumps(asdict(holder)).encode()
    if len(data) >= RECORD_SIZE:
        raise RuntimeError(f"lease record too long ({len(data)} bytes)")
    return data + b" " * (RECORD_SIZE - 1 - len(data)) + b"\n"


def _flock_held_elsewhere(path: str) -> bool:
    """True if another process holds the flock of ``path`` (only meaningful on the same host)."""
    if fcntl is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        return e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
    finally:
        os.close(fd)  # releases the probe lock
    return False


LIVE_JOB_STATES = ("RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STOPPED", "RESIZING", "SIGNALING")


def _slurm_job_state(job_id: str) -> str | None:
    """JobState of ``job_id`` from ``scontrol``; ``ENDED`` once Slurm forgot it; None if Slurm can't tell."""
    try:
        proc = subprocess.run(
            ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None  # no Slurm here (another cluster's lease on a shared filesystem): the heartbeat decides
    if proc.returncode != 0:
        return "ENDED" if "Invalid job id" in proc.stderr else None
    for field in proc.stdout.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    return None


def why_stale(holder: Holder, path: str, now: float | None = None) -> str | None:
    """The reason ``holder`` is dead (its lease may be taken over), or None if it must be taken as alive."""
    now = time.time() if now is None else now
    job_id, restarts = this_job()
    if job_id is not None and holder.job_id == job_id and restarts > holder.restart_count:
        return f"Slurm requeued job {job_id}: restart {restarts} takes over from {holder.restart_count}"
    if holder.host == socket.gethostname() and not _pid_alive(holder.pid) and not _flock_held_elsewhere(path):
        return f"pid {holder.pid} on {holder.host} is gone"
    if holder.job_id is not None and holder.job_id != job_id:
        state = _slurm_job_state(holder.job_id)
        if state is not None and state not in LIVE_JOB_STATES:
            return f"its Slurm job {holder.job_id} is {state}"
    age = now - holder.heartbeat
    if age > holder.stale_after * holder.heartbeat_s:
        return f"its heartbeat is {age:.0f} s old (> {holder.stale_after:g} x {holder.heartbeat_s:g} s)"
    return None


class RunDirLease:
    """Holds ``run_dir/.lease`` from :meth:`acquire` to :meth:`release`.

    Args:
        run_dir: the run directory (created by the caller).
        heartbeat_s: seconds between heartbeats.
        stale_after: a heartbeat older than this many intervals marks the holder as dead.
    """

    def __init__(self, run_dir: str, heartbeat_s: float = 30.0, stale_after: float = 10.0) -> None:
        self.path = os.path.join(run_dir, LEASE_FILE)
        job_id, restarts = this_job()
        now = time.time()
        self.holder = Holder(
            host=socket.gethostname(), pid=os.getpid(), job_id=job_id, restart_count=restarts, started=now,
            heartbeat=now, heartbeat_s=heartbeat_s, stale_after=stale_after, token=uuid.uuid4().hex,
        )  # fmt: skip
        self.took_over: Holder | None = None
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    # ------------------------------------------------------------------------------------------ acquire

    def acquire(self) -> RunDirLease:
        """Take the lease or raise :class:`LeaseHeldError` naming the live holder; starts the heartbeat."""
        for _ in range(10):  # a few rounds: a racing taker may change the file between our steps
            if self._try_link():
                self._hold()
                return self
            current = _read(self.path)
            if current is None:
                continue  # released meanwhile
            reason = why_stale(current, self.path)
            if reason is None:
                raise LeaseHeldError(
                    f"run_dir {os.path.dirname(self.path)} is in use by another job ({current.describe()}); "
                    f"wait for it to end, or use another run_dir. Lease file: {self.path}"
                )
            if self._take_over(current):
                log.warning(
                    "run_dir lease %s: taking over from a dead holder (%s): %s",
                    self.path, current.describe(), reason,
                )  # fmt: skip
                self.took_over = current
                self._hold()
                return self
        raise LeaseHeldError(f"{self.path}: could not take the lease (other jobs keep racing for it)")

    def _write_record(self, path: str) -> None:
        with open(path, "wb") as f:
            f.write(_encode(self.holder))
            f.flush()
            os.fsync(f.fileno())

    def _try_link(self, target: str | None = None) -> bool:
        """Create ``target`` (default: the lease) holding our record, atomically; False if it exists."""
        target = self.path if target is None else target
        tmp = f"{target}.{self.holder.token}"
        self._write_record(tmp)
        try:
            os.link(tmp, target)
            return True
        except FileExistsError:
            # NFS: a retried LINK whose first reply was lost reports EEXIST although it worked.
            return os.stat(tmp).st_nlink == 2
        finally:
            os.unlink(tmp)

    def _take_over(self, stale: Holder) -> bool:
        """Replace the lease of ``stale`` by ours, under a takeover lock so only one taker acts on it."""
        lock = f"{self.path}.takeover"
        if not self._try_link(lock):
            try:  # a taker that died within its takeover leaves the lock: it is never held for long
                if time.time() - os.stat(lock).st_mtime > TAKEOVER_LOCK_S:
                    os.unlink(lock)
            except FileNotFoundError:
                pass
            time.sleep(0.05)
            return False
        try:
            current = _read(self.path)
            if current is None or current.token != stale.token:
                return False  # released or taken meanwhile: judge the new state
            tmp = f"{self.path}.{self.holder.token}"
            self._write_record(tmp)
            os.replace(tmp, self.path)  # the lease file never disappears, so no plain link can slip in
            return True
        finally:
            os.unlink(lock)

    def _hold(self) -> None:
        if fcntl is not None:
            self._fd = os.open(self.path, os.O_RDWR)
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pass  # a filesystem without flock (some NFS mounts): the heartbeat is what counts
        self._thread = threading.Thread(target=self._beat, name="run-dir-lease", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------------------------------- heartbeat

    def _beat(self) -> None:
        while not self._stop.wait(self.holder.heartbeat_s):
            try:
                self.heartbeat()
            except (OSError, RuntimeError) as e:  # an NFS hiccup, a torn read: the next beat tries again
                log.warning("run_dir lease %s: heartbeat failed: %s", self.path, e)

    def heartbeat(self) -> None:
        """Refresh the heartbeat in place (same inode, so the flock stays); stops if the lease was lost."""
        current = _read(self.path)
        if current is None or current.token != self.holder.token:
            if not self.lost:
                self.lost = True
                who = current.describe() if current is not None else "nobody (file removed)"
                log.error("run_dir lease %s was taken over; it is now held by %s", self.path, who)
            self._stop.set()
            return
        self.holder.heartbeat = time.time()
        with open(self.path, "r+b") as f:
            f.write(_encode(self.holder))
            f.flush()
            os.fsync(f.fileno())

    # ------------------------------------------------------------------------------------------ release

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still ours. Idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        current = _read(self.path)
        if current is not None and current.token == self.holder.token:
            os.unlink(self.path)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
