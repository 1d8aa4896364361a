"""The GPU check, run by the last device call of ``bench/gpu_prepare.py``'s plan: one JSON and one log.

    python3 bench/gpu_check.py              # on the lent GPU machine (wheels in /tmp/pvt-wheels)
    .venv/bin/python bench/gpu_check.py --cpu --wheels .gpu_wheels   # here: every part in its CPU form

Parts, in order, each under its own timeout so one failure cannot eat the others' time:
  install     reassemble wheels.tar from its pieces (sha256 from MANIFEST), install the distributions
              this Python lacks into a --target folder (first on PYTHONPATH for every later part)
  tests       pytest -m gpu
  train_step  PVT-Small and PVT-Large, bf16, batch 128, ZeRO-0: img/s and MFU, each against timm's
              pvt_v2_b2 / pvt_v2_b4 in the same process (bench/train_step.py)
  dali        DALI "mixed" (nvJPEG) vs cpu decode + augmentation img/s on real photos at ImageNet size,
              re-encoded into shards on the spot (bench/data_throughput.py)
  fp16        a short fp16 run of launch/train.py with dynamic loss scaling: skipped steps, loss scale
The report (OUT/gpu_check.json) is rewritten after every part, so a timeout still leaves what was measured;
OUT/gpu_check.log has every part's output. ``--cpu`` runs the same commands at toy sizes on this machine
(bf16 instead of fp16, which DeepSpeed refuses on CPU; the mixed-decode row reports itself skipped), and
``install`` then checks and unpacks the pieces but installs nothing (its wheels are for Python 3.12).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ["install", "tests", "train_step", "dali", "fp16"]
# Hard caps per part (their sum bounds the last call) and the expected times on an H100/H200 (not yet
# measured there: bench/gpu_prepare.py plans with these).
TIMEOUT_S = {"install": 50, "tests": 100, "train_step": 90, "dali": 65, "fp16": 65}
EXPECTED_S = {"install": 30, "tests": 80, "train_step": 60, "dali": 45, "fp16": 45}
ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="4")
# Dense bf16 peak (TFLOP/s) for MFU, by GPU name.
PEAK_TFLOPS = {"H100 PCIe": 756, "H100": 989, "H200": 989, "H800": 989, "A100": 312}


class Log:
    """Prints and appends to OUT/gpu_check.log."""

    def __init__(self, path: Path):
        self.f = path.open("w")

    def __call__(self, *parts) -> None:
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        self.f.write(line + "\n")
        self.f.flush()


def run(log: Log, cmd: list[str], timeout: int, cwd=ROOT) -> tuple[int, str]:
    """(exit code, output) of ``cmd``; output goes to the log as well. 124 = timed out."""
    log("$", " ".join(cmd))
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
        out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        out, rc = out + f"\n[timed out after {timeout} s]", 124
    log("\n".join(line for line in out.splitlines() if "Warning" not in line)[-6000:])
    return rc, out


def sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def part_install(args, log: Log) -> dict:
    wheels = Path(args.wheels)
    manifest = dict(reversed(line.split()) for line in (wheels / "MANIFEST").read_text().splitlines())
    pieces = sorted(p for p in manifest if p.startswith("wheels.tar.part"))
    missing = [p for p in pieces if not (wheels / p).is_file()]
    if missing:
        return {"error": f"pieces missing in {wheels}: {missing}"}
    bad = [p for p in pieces if sha256(wheels / p) != manifest[p]]
    if bad:
        return {"error": f"pieces corrupt: {bad}"}
    work = Path(args.work)
    tar = work / "wheels.tar"
    with tar.open("wb") as out:
        for p in pieces:
            out.write((wheels / p).read_bytes())
    if sha256(tar) != manifest["wheels.tar"]:
        return {"error": "reassembled wheels.tar does not match MANIFEST"}
    whl = work / "whl"
    with tarfile.open(tar) as t:
        t.extractall(whl, filter="data")
    tar.unlink()
    todo = []
    for w in sorted(whl.glob("*.whl")):
        name, ver = w.name.split("-")[:2]
        try:
            version(name)  # this Python has it already (any version): keep its own
        except PackageNotFoundError:
            todo.append(w)
    log(f"{len(todo)} of {len(list(whl.glob('*.whl')))} wheels to install:", " ".join(w.name for w in todo))
    res = {
        "pieces": len(pieces),
        "wheels": len(list(whl.glob("*.whl"))),
        "to_install": [w.name for w in todo],
    }
    if args.cpu:
        return res | {"installed": False, "note": "CPU mode: the wheels are cp312, nothing installed here"}
    site = Path(args.site)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-index",
        "--no-deps",
        "--quiet",
        "--target",
        str(site),
    ]
    rc, _ = run(log, cmd + [str(w) for w in todo], TIMEOUT_S["install"])
    if rc != 0:
        return res | {"error": f"pip install exit {rc}"}
    # Several distributions ship nvidia/__init__.py; make it a path-extending package so nvidia.dali (here)
    # and torch's nvidia.* libraries (its site-packages) are both importable.
    init = site / "nvidia" / "__init__.py"
    if init.parent.is_dir():
        init.write_text("__path__ = __import__('pkgutil').extend_path(__path__, __name__)\n")
    activate(site)
    check = (
        "import deepspeed, nvidia.dali, webdataset, pycocotools; print('imports ok', deepspeed.__version__)"
    )
    rc, out = run(log, [sys.executable, "-c", check], 120)
    return res | {"installed": rc == 0, "imports": out.strip().splitlines()[-1:]}


def activate(site: Path) -> None:
    """Later parts (subprocesses, and this process's imports) use ``site`` first, with its CUDA libraries."""
    ENV["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT), ENV.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    libs = sorted(glob.glob(str(site / "nvidia" / "*" / "lib")))
    ENV["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [ENV.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)
    ENV["PATH"] = os.pathsep.join([str(site / "bin"), ENV["PATH"]])
    os.environ["PATH"] = ENV["PATH"]  # wds2idx (DALI's index tool) for shards built in this process
    sys.path[:0] = [str(site), str(ROOT)]


def part_tests(args, log: Log) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
           "--continue-on-collection-errors", "tests"]  # fmt: skip
    rc, out = run(log, cmd, TIMEOUT_S["tests"])
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", out)}
    return {"exit": rc, **counts}


def part_train_step(args, log: Log) -> dict:
    work = Path(args.work)
    if args.cpu:
        sizes = ["--models", "pvt_tiny", "--batch", "2", "--size", "64", "--steps", "1", "--warmup", "1"]
    else:
        import torch

        name = torch.cuda.get_device_name(0)
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        sizes = ["--models", "pvt_small", "pvt_large", "--batch", "128", "--steps", "10", "--warmup", "3"]
        sizes += ["--peak-tflops", str(peak)] if peak else []
    out = work / "train_step.json"
    cmd = [
        sys.executable,
        "bench/train_step.py",
        *sizes,
        "--dtype",
        "bf16",
        "--zero",
        "0",
        "--json",
        str(out),
    ]
    rc, _ = run(log, cmd, TIMEOUT_S["train_step"])
    return {"exit": rc, **(json.loads(out.read_text()) if out.is_file() else {})}


def photo_copies(args) -> int:
    """Copies per photo in the shards of real photos (8 photos x copies per split)."""
    return 12 if args.cpu else 100


def photo_args(args) -> list[str]:
    sizes = ["--batch", "16", "--size", "64"] if args.cpu else ["--batch", "128"]
    return ["--copies", str(photo_copies(args)), *sizes]


def part_dali(args, log: Log) -> dict:
    out = Path(args.work) / "data_throughput.json"
    timing = ["--batches", "2", "--warmup", "1", "--threads", "2"] if args.cpu else \
        ["--batches", "8", "--warmup", "2", "--threads", "8"]  # fmt: skip
    cmd = [sys.executable, "bench/data_throughput.py", *photo_args(args), *timing, "--backends", "dali",
           "--json", str(out)]  # fmt: skip
    rc, _ = run(log, cmd, TIMEOUT_S["dali"])
    return {"exit": rc, **(json.loads(out.read_text()) if out.is_file() else {})}


def part_fp16(args, log: Log) -> dict:
    """launch/train.py on the photo shards; DeepSpeed skips the steps whose fp16 gradients overflow."""
    sys.path.insert(0, str(ROOT / "bench"))
    from data_throughput import build_photo_shards, photo_shards_dir  # the dali part's shards (built once)

    shards = build_photo_shards(photo_shards_dir(photo_copies(args)), photo_copies(args))
    work = Path(args.work)
    run_dir = work / "fp16_run"
    steps, size, batch = (2, 64, 8) if args.cpu else (40, 224, 64)
    precision = "bf16" if args.cpu else "fp16"  # DeepSpeed refuses fp16 on CPU
    overrides = [
        f"run_dir={run_dir}", "model.name=pvt_v2_b0", "checkpoint.resume=false",
        f"schedule.total_steps={steps}", "schedule.warmup_steps=1", "optim.lr=1e-3", "optim.scale_lr=false",
        f"deepspeed.precision={precision}", "deepspeed.zero_stage=2", f"deepspeed.micro_batch={batch}",
        "deepspeed.grad_accum=1", f"data.train_shards={shards}", f"data.val_shards={shards}",
        "data.num_classes=2", f"data.train_size={size}", f"data.val_size={size}", "logging.log_every=5",
        "logging.tensorboard=false", "eval.at_end=true", f"checkpoint.every_steps={steps}",
    ]  # fmt: skip
    shutil.rmtree(run_dir, ignore_errors=True)  # a rerun starts afresh
    config = work / "fp16.yaml"
    config.write_text("model: {name: pvt_v2_b0, drop_path_rate: 0.0}\n")
    rc, _ = run(
        log, [sys.executable, "launch/train.py", "--config", str(config), *overrides], TIMEOUT_S["fp16"]
    )
    res: dict = {"exit": rc, "precision": precision, "steps": steps}
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        recs = [json.loads(line) for line in metrics.read_text().splitlines()]
        train = [r for r in recs if r["kind"] == "train"]
        res["log_steps"] = [
            {k: r.get(k) for k in ("step", "train/loss", "train/loss_scale", "train/skipped_steps",
                                   "perf/images_per_s")}
            for r in train
        ]  # fmt: skip
        res["skipped_steps"] = train[-1].get("train/skipped_steps") if train else None
        res["val"] = [r for r in recs if r["kind"] == "val"][-1:]
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="every part in its CPU form, at toy sizes (dry run)")
    p.add_argument("--parts", nargs="+", default=PARTS, choices=PARTS)
    p.add_argument("--wheels", default="/tmp/pvt-wheels", help="folder with MANIFEST and wheels.tar.partNN")
    p.add_argument("--site", default="/tmp/pvt-site", help="pip --target folder of the installed wheels")
    p.add_argument("--work", default="/tmp/pvt-gpu-check", help="scratch: runs, partial JSON (not returned)")
    p.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "build/gpu_check")),
                   help="gpu_check.json + gpu_check.log go here (default $OUT)")  # fmt: skip
    args = p.parse_args(argv)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    ENV.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / "build/torch_extensions"))
    if args.cpu:
        ENV["OMP_NUM_THREADS"] = "1"
    ENV["PYTHONPATH"] = os.pathsep.join([str(ROOT), ENV.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if not args.cpu and "install" not in args.parts and Path(args.site).is_dir():
        activate(Path(args.site))  # a rerun on the warm machine: installed by an earlier call
    log = Log(out / "gpu_check.log")
    import platform

    import torch

    report: dict = {
        "mode": "cpu" if args.cpu else "gpu",
        "env": {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "parts": {},
    }  # fmt: skip
    log("gpu_check", json.dumps(report["env"]))
    for name in args.parts:
        log(f"=== {name} ===")
        t0 = time.perf_counter()
        try:
            res = globals()[f"part_{name}"](args, log)
        except Exception as e:  # one broken part must not cost the others
            res = {"error": f"{type(e).__name__}: {e}"}
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        report["parts"][name] = res
        brief = {k: v for k, v in res.items() if k not in ("rows", "setup", "log_steps")}
        log(f"--- {name}: {json.dumps(brief)}")
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    for r in report["parts"].get("train_step", {}).get("rows", []):
        log(f"{r['impl']:<9} {r['model']:<10} {r['img_per_s']:>9.1f} img/s  MFU {100 * r['mfu']:5.1f}%  "
            f"vs timm {r['speed_vs_timm']}")  # fmt: skip
    for r in report["parts"].get("dali", {}).get("rows", []):
        log(f"data {r['backend']} {r['device']:<5} {r['split']:<5} {r['images_per_s']} img/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
