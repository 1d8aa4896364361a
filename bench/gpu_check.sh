#!/usr/bin/env bash
# One GPU check (one H100, no internet, < 8 min): gpu tests, training-step throughput + MFU (ours vs timm),
# DALI "mixed" decoding. Writes JSON to $OUT (default build/gpu_check/out) and prints a table.
#
#   bash bench/gpu_check.sh                 # all phases: install tests train dali report
#   bash bench/gpu_check.sh install tests   # some phases (state persists in build/gpu_check between calls)
#
# Wheels travel as pieces made by bench/gpu_wheels.sh (build/gpu_wheels/*.tar.partNN + MANIFEST), one
# piece per `run` call; the sequence of calls is in docs/performance.md. `install` installs whatever is
# complete (essentials: DeepSpeed, webdataset, timm, pytest, ...; dali: DALI and its codec libraries) and
# deletes the pieces it used. Every later phase measures what it can: without DALI, the data phase is
# skipped and reported as such; without DeepSpeed, nothing but the report runs.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
STATE=$ROOT/build/gpu_check
# Results persist in $RES across calls on a warm machine; every call copies them all to $OUT.
RES=$STATE/out
OUT=${OUT:-$RES}
WHEELS=$ROOT/build/gpu_wheels
PY=${PY:-python3}
mkdir -p "$STATE/site" "$RES" "$OUT"
# Installed into a target folder inside build/ so a later call on the same warm machine still sees them.
export PYTHONPATH=$STATE/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PATH=$STATE/site/bin:$PATH
export TORCH_EXTENSIONS_DIR=$STATE/torch_extensions
export PYTHONUNBUFFERED=1
PHASES=("$@")
[ ${#PHASES[@]} -eq 0 ] && PHASES=(install tests train dali report)
log() { echo "[gpu_check $(date +%H:%M:%S)] $*"; }

# Peak dense bf16 TFLOP/s from the datasheet, by name; unknown cards use the measured matmul instead.
peak_tflops() {
  local name
  name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
  case "$name" in
    *H100*PCIe*) echo 756 ;;
    *H100* | *H200* | *H800*) echo 989 ;;
    *A100*) echo 312 ;;
    *) echo "" ;;
  esac
}

phase_install() {
  "$PY" - <<'EOF' > "$RES/env.json"
import json, platform, sys, torch
print(json.dumps({"python": platform.python_version(), "torch": torch.__version__,
                  "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}))
EOF
  cat "$RES/env.json"
  [ -f "$WHEELS/MANIFEST" ] || { log "no $WHEELS/MANIFEST: nothing to install"; return 0; }
  cp "$WHEELS/MANIFEST" "$STATE/MANIFEST"
  for name in essentials dali; do
    [ -f "$STATE/$name.installed" ] && { log "$name: already installed"; continue; }
    mapfile -t parts < <(grep -oE "\./$name\.tar\.part[0-9]+" "$STATE/MANIFEST" | sed 's|^\./||')
    local missing=()
    for p in "${parts[@]}"; do [ -f "$WHEELS/$p" ] || missing+=("$p"); done
    if [ ${#missing[@]} -gt 0 ]; then
      log "$name: waiting for ${missing[*]} (${#parts[@]} pieces in all)"
      continue
    fi
    (cd "$WHEELS" && grep -E "\./$name\.tar\.part" "$STATE/MANIFEST" | sha256sum -c --quiet) || {
      log "$name: a piece is corrupt"
      continue
    }
    for p in "${parts[@]}"; do cat "$WHEELS/$p"; done > "$STATE/$name.tar"
    (cd "$STATE" && grep -E " $name\.tar$" MANIFEST | sha256sum -c --quiet) || {
      log "$name: reassembled tar does not match"
      continue
    }
    mkdir -p "$STATE/$name" && tar -C "$STATE/$name" -xf "$STATE/$name.tar" && rm -f "$STATE/$name.tar"
    for p in "${parts[@]}"; do rm -f "$WHEELS/$p"; done
    # Only the distributions this machine lacks (any version): its own torch stack stays untouched.
    "$PY" - "$STATE/$name/requirements.txt" > "$STATE/$name/missing.txt" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
for line in open(sys.argv[1]):
    name = line.split("==")[0].strip()
    try:
        version(name)
    except PackageNotFoundError:
        print(line.strip())
EOF
    log "$name: installing $(wc -l < "$STATE/$name/missing.txt") of $(wc -l < "$STATE/$name/requirements.txt")"
    if "$PY" -m pip install --quiet --no-index --find-links "$STATE/$name/wheels" --target "$STATE/site" \
      --no-deps -r "$STATE/$name/missing.txt" 2>&1 | tail -5; then
      touch "$STATE/$name.installed"
    fi
  done
  if "$PY" -c "import deepspeed, webdataset, timm" 2>/dev/null; then log "DeepSpeed/webdataset/timm import"; else
    log "DeepSpeed/webdataset/timm missing"; fi
  if "$PY" -c "import nvidia.dali" 2>/dev/null; then log "DALI imports"; else log "DALI missing"; fi
}

phase_tests() {
  "$PY" -c "import pytest, deepspeed" 2>/dev/null || { log "tests: pytest/DeepSpeed missing, skipped"; return 0; }
  timeout 200 "$PY" -m pytest -m gpu -q -p no:cacheprovider --junitxml="$RES/pytest_gpu.xml" tests \
    2>&1 | tail -15
  echo "pytest exit ${PIPESTATUS[0]}" > "$RES/pytest_gpu.status"
}

phase_train() {
  "$PY" -c "import deepspeed, timm" 2>/dev/null || { log "train: DeepSpeed/timm missing, skipped"; return 0; }
  local peak
  peak=$(peak_tflops)
  local common=(--batch 128 --dtype bf16 --zero 0 --steps 15 --warmup 5 --optim torch-fused)
  [ -n "$peak" ] && common+=(--peak-tflops "$peak")
  # PVT v1 against timm's PVTv2 of the same depths, then the same architecture (PVTv2) on both sides.
  timeout 150 "$PY" bench/train_step.py --models pvt_small pvt_large pvt_v2_b2 "${common[@]}" \
    --json "$RES/train_step.json" 2>&1 | grep -v Warning | tail -12
  # Optimisations one at a time on PVT-Large (no timm rows): channels-last, torch.compile, ZeRO-2.
  timeout 60 "$PY" bench/train_step.py --models pvt_large --no-timm "${common[@]}" --channels-last \
    --json "$RES/train_step_channels_last.json" 2>&1 | tail -3
  timeout 60 "$PY" bench/train_step.py --models pvt_large --no-timm "${common[@]}" --zero 2 --json "$RES/train_step_zero2.json" 2>&1 | tail -3
  timeout 180 "$PY" bench/train_step.py --models pvt_large --no-timm "${common[@]}" --compile \
    --json "$RES/train_step_compile.json" 2>&1 | tail -3
}

phase_dali() {
  "$PY" -c "import nvidia.dali, webdataset" 2>/dev/null || {
    log "dali: DALI missing, data phase skipped"
    echo '{"skipped": "DALI not installed"}' > "$RES/data_throughput.json"
    return 0
  }
  # Real photos at ImageNet size (~500x375), many distinct JPEGs: nvJPEG's cost is representative.
  timeout 240 "$PY" bench/data_throughput.py --photos "$STATE/essentials/photos" --copies 200 --batch 128 \
    --batches 8 --warmup 2 --threads 8 --json "$RES/data_throughput.json" 2>&1 | tail -12
}

phase_report() {
  "$PY" - "$RES" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
report = {}
for f in sorted(out.glob("*.json")):
    if f.name != "gpu_check.json":
        report[f.stem] = json.loads(f.read_text())
st = out / "pytest_gpu.status"
report["pytest_gpu"] = st.read_text().strip() if st.exists() else "not run"
(out / "gpu_check.json").write_text(json.dumps(report, indent=1))
print("=== gpu_check summary ===")
print("env:", report.get("env"))
print("pytest -m gpu:", report["pytest_gpu"])
print(f"{'run':<28} {'impl':<9} {'model':<10} {'img/s':>9} {'MFU':>6} {'vs timm':>7}")
for key, val in report.items():
    if key.startswith("train_step"):
        for r in val["rows"]:
            vs = r["speed_vs_timm"]
            print(f"{key:<28} {r['impl']:<9} {r['model']:<10} {r['img_per_s']:>9.1f} {100 * r['mfu']:>5.1f}% "
                  f"{vs if vs is not None else '-':>7}")
data = report.get("data_throughput", {})
for r in data.get("rows", []):
    print(f"data {r['backend']:<9} {r['device']:<4} {r['split']:<6} {r['images_per_s']:>9.1f} img/s")
if "skipped" in data:
    print("data:", data["skipped"])
EOF
}

for ph in "${PHASES[@]}"; do
  log "phase $ph"
  "phase_$ph"
done
if [ "$OUT" != "$RES" ]; then cp -r "$RES"/. "$OUT"/; fi
