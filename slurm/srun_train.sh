# shellcheck shell=bash
# Sourced by slurm/pretrain.sh and slurm/finetune_detr.sh inside the batch job (not a standalone script):
# starts one training process per task with srun and relays preemption/timeout signals to it.
#
# Reads: TRAIN_SCRIPT (entry point, e.g. launch/train.py), CONFIG (YAML), OVERRIDES (space-separated dotted
# overrides), PYTHON (interpreter; default the repo's .venv/bin/python, else python3), PVT_DIST_ROOT (the
# repository, set by the calling script).
# Exports MASTER_ADDR/MASTER_PORT; each task derives RANK/WORLD_SIZE/LOCAL_RANK from SLURM_PROCID/
# SLURM_NTASKS/SLURM_LOCALID (pvt_dist/cluster/distributed.py): global rank shards the data, local rank picks the GPU.

set -euo pipefail

cd "$PVT_DIST_ROOT"
[[ -f "$TRAIN_SCRIPT" ]] || { echo "srun_train: $PVT_DIST_ROOT/$TRAIN_SCRIPT not found; set PVT_DIST_ROOT" >&2; exit 2; }
[[ -f "$CONFIG" ]] || { echo "srun_train: CONFIG=$CONFIG: no such file (relative to $PVT_DIST_ROOT)" >&2; exit 2; }
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# A requeued run keeps its job id: shift the port with the restart count so that the new rendezvous never
# meets the previous run's socket in TIME_WAIT.
MASTER_PORT=${MASTER_PORT:-$((20000 + (SLURM_JOB_ID * 8 + ${SLURM_RESTART_COUNT:-0}) % 40000))}
export MASTER_ADDR MASTER_PORT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export PYTHONUNBUFFERED=1

echo "[$(date -u +%FT%TZ)] job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: ${SLURM_NTASKS} tasks on" \
    "$SLURM_JOB_NODELIST, master $MASTER_ADDR:$MASTER_PORT: $TRAIN_SCRIPT --config $CONFIG ${OVERRIDES:-}"

srun_args=(--kill-on-bad-exit=1 --unbuffered)
# Slurm 22.05's srun does not inherit --cpus-per-task from the allocation.
[[ -n "${SLURM_CPUS_PER_TASK:-}" ]] && srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")

# Each task starts with USR1 ignored (an ignored signal stays ignored across exec) until the trainer's
# PreemptionHandler installs its own handler: a USR1 during start-up (imports, data, DeepSpeed init) would
# otherwise kill the task with the default action and fail the job instead of requeueing it.
# OVERRIDES is word-split on purpose: "optim.lr=1e-3 run_dir=runs/x" -> two arguments.
# shellcheck disable=SC2016,SC2086
srun "${srun_args[@]}" bash -c 'trap "" USR1; exec "$@"' task \
    "$PYTHON" "$TRAIN_SCRIPT" --config "$CONFIG" ${OVERRIDES:-} &
SRUN_PID=$!

# `--signal=B:USR1@T` only reaches this shell: pass it on to srun, which signals every task. Because a
# task still starting up ignores it, USR1 is repeated every RELAY_INTERVAL s until the step ends (the
# handler only sets a flag, so repeats are harmless). SIGTERM (preemption, scancel) is relayed once.
RELAY_INTERVAL=${RELAY_INTERVAL:-15}
INTERRUPTED=0
REPEATER=""
# shellcheck disable=SC2317  # invoked by the traps below
relay() {
    INTERRUPTED=1
    echo "[$(date -u +%FT%TZ)] batch script got SIG$1: forwarding to the training step"
    kill -s "$1" "$SRUN_PID" 2>/dev/null || true
    if [[ $1 == USR1 && -z "$REPEATER" ]]; then
        (while sleep "$RELAY_INTERVAL" && kill -s USR1 "$SRUN_PID" 2>/dev/null; do
            echo "[$(date -u +%FT%TZ)] repeating SIGUSR1 to the training step"
        done) &
        REPEATER=$!
    fi
}
trap 'relay USR1' USR1
trap 'relay TERM' TERM

# `wait` returns early when a trapped signal arrives: wait again until srun itself has exited.
while true; do
    INTERRUPTED=0
    rc=0
    wait "$SRUN_PID" || rc=$?
    ((INTERRUPTED)) || break
done
if [[ -n "$REPEATER" ]]; then kill "$REPEATER" 2>/dev/null || true; fi
echo "[$(date -u +%FT%TZ)] training step exited with status $rc"
exit "$rc"
