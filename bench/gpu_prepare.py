"""Pack what the lent GPU machine lacks, in chunks that fit one ``run`` call each, and print the calls.

    .venv/bin/python bench/gpu_prepare.py              # download (cached), chunk, print the plan
    .venv/bin/python bench/gpu_prepare.py --plan-only  # print the plan of the chunks already made

The GPU machine (docs/performance.md, "GPU check") has Python 3.12, torch with CUDA 13 and a list of
common packages, but no DeepSpeed, DALI, webdataset, submitit or pycocotools, and no network. The
wheels it needs are derived here, not listed by hand: the dependency closure (``Requires-Dist``, markers
evaluated for CPython 3.12 on Linux, extras followed) of what the project imports, minus the closure
of what the machine already has. Versions are those of this venv, so the GPU runs what was tested here.
They are downloaded as cp312 manylinux wheels (DeepSpeed, an sdist, is built here into a pure-Python
wheel: its ops JIT-compile), packed into one tar, cut into pieces that fit the per-call limit with the
working tree that travels with every call, and checked by sha256 there.

Each call but the last moves its piece out of the carried folder to /tmp/pvt-wheels (which survives
between calls while the machine is warm); the last one carries the last piece and runs
``bench/gpu_check.py``, which reassembles, installs into a --target folder and runs the check.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
# What the project imports on the GPU and the machine lacks (REFERENCE: the lent machine's software).
NEEDED = ["deepspeed", "nvidia-dali-cuda130", "webdataset", "submitit", "pycocotools"]
# Installed there: torch's own stack plus this list; their dependency closures are installed too.
ON_MACHINE = [
    "torch", "torchvision", "timm", "scipy", "scikit-image", "scikit-learn", "pytest", "tensorboard",
    "numpy", "pillow", "psutil", "py-cpuinfo", "ninja", "msgpack", "einops", "packaging", "pyyaml",
    "tqdm", "opencv-python-headless",
]  # fmt: skip
# The CUDA codec libraries DALI loads are not part of torch's stack, whatever the closure says.
NOT_ON_MACHINE = {"nvidia-nvjpeg", "nvidia-nvjpeg2k-cu13", "nvidia-nvtiff-cu13", "nvidia-nvimgcodec-cu13",
                  "nvidia-libnvcomp-cu13"}  # fmt: skip
PIP_TARGET = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
              "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
              "--platform", "manylinux2014_x86_64"]  # fmt: skip
# Test data the gpu-marked tests read, built here (the GPU machine has neither the Debian Fashion-MNIST
# package nor network for the labelme sdist): carried with the last call.
TEST_DATA = ["build/test-data/fmnist-2048-512-v1", "build/test-data/labelme_coco"]
OUT_DIR = ".gpu_wheels"  # ignored by git; carried piece by piece
REMOTE_DIR = "/tmp/pvt-wheels"  # survives between calls while the machine stays warm
CALL_LIMIT = 64 * 2**20  # bytes one call may carry, working tree included
CMD_LIMIT = 2000
# Machine-time model of the plan (seconds): start-up and per-call overhead (transfer + setup); the check's
# parts come from bench/gpu_check.py (expected times and hard caps).
START_S, CALL_S = 90, 25


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots: list[str]) -> dict[str, str]:
    """{name: version} of ``roots`` and everything they require here, as it would be on Python 3.12."""
    env = default_environment()
    env.update(python_version="3.12", python_full_version="3.12.3", sys_platform="linux",
               platform_system="Linux", platform_machine="x86_64", implementation_name="cpython")  # fmt: skip
    seen: dict[str, str] = {}
    todo: list[tuple[str, frozenset]] = [(r, frozenset()) for r in roots]
    done: set[tuple[str, frozenset]] = set()
    while todo:
        name, extras = todo.pop()
        key = (canon(name), extras)
        if key in done:
            continue
        done.add(key)
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue  # an optional dependency not installed here is not needed there either
        seen[canon(dist.metadata["Name"])] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            wanted = [req.marker is None] + [
                req.marker.evaluate({**env, "extra": e}) for e in (extras or {""}) if req.marker
            ]
            if any(wanted):
                todo.append((req.name, frozenset(req.extras)))
    return seen


def wanted_wheels() -> dict[str, str]:
    have = closure(ON_MACHINE)
    need = closure(NEEDED)
    return {n: v for n, v in sorted(need.items()) if n not in have or n in NOT_ON_MACHINE}


def download(pkgs: dict[str, str], dest: Path) -> list[Path]:
    """One wheel per package in ``dest`` (kept between runs: a rerun downloads nothing)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name, version in pkgs.items():
        stem = f"{canon(name).replace('-', '_')}-{version}-"
        if any(canon(p.name).replace("-", "_").startswith(stem.lower()) for p in dest.glob("*.whl")):
            continue
        pin = f"{name}=={version}"
        pip = [sys.executable, "-m", "pip", "--quiet"]
        res = subprocess.run(pip + ["download", "--no-deps", *PIP_TARGET, "-d", str(dest), pin])
        if res.returncode != 0:
            # No binary wheel (DeepSpeed): build it here; it is pure Python, its CUDA ops JIT-compile there.
            print(f"{pin}: no cp312 wheel, building one (pip wheel --no-deps)", file=sys.stderr)
            subprocess.run(
                pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(dest), pin], check=True
            )
    wheels = sorted(dest.glob("*.whl"))
    names = {canon(p.name.split("-")[0]) for p in wheels}
    missing = [n for n in pkgs if canon(n) not in names]
    if missing:
        raise SystemExit(f"no wheel for {missing} in {dest}")
    for p in wheels:
        tag = p.name.rsplit("-", 3)[1:]
        if not (tag[0] in ("py3", "py2.py3", "cp312", "py312") or tag[1] == "abi3"):
            raise SystemExit(f"{p.name}: not installable on CPython 3.12")
    return wheels


def sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def tree_bytes() -> int:
    """Bytes of the working tree that travels with every call (tracked + untracked-not-ignored files)."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, check=True, capture_output=True,
    ).stdout.split(b"\0")  # fmt: skip
    return sum((ROOT / f.decode()).stat().st_size for f in files if f and (ROOT / f.decode()).is_file())


def pack(wheels: list[Path], out: Path, chunk: int) -> list[Path]:
    """wheels.tar cut into pieces of at most ``chunk`` bytes, plus MANIFEST (sha256 of the tar and pieces)."""
    for old in out.glob("wheels.tar.part*"):
        old.unlink()
    tar = out / "wheels.tar"
    subprocess.run(
        ["tar", "-C", str(wheels[0].parent), "-cf", str(tar)] + [w.name for w in wheels], check=True
    )
    parts = []
    with tar.open("rb") as f:
        for i in range(math.ceil(tar.stat().st_size / chunk)):
            part = out / f"wheels.tar.part{i:02d}"
            part.write_bytes(f.read(chunk))
            parts.append(part)
    lines = [f"{sha256(tar)}  wheels.tar"] + [f"{sha256(p)}  {p.name}" for p in parts]
    (out / "MANIFEST").write_text("\n".join(lines) + "\n")
    tar.unlink()
    return parts


def plan(parts: list[Path], tree: int) -> list[tuple[str, list[str], int]]:
    """[(command, carry paths, bytes carried)] for the device calls, in order."""
    calls = []
    stash = f"mkdir -p {REMOTE_DIR} && mv {OUT_DIR}/{{p}} {REMOTE_DIR}/"
    for i, p in enumerate(parts[:-1]):
        cmd = stash.format(p=p.name) + f" && ls -l {REMOTE_DIR}"
        if i == 0:  # the first call also records what the machine has
            cmd += " && nvidia-smi -L && python3 -V"
        calls.append((cmd, [f"{OUT_DIR}/{p.name}"], tree + p.stat().st_size))
    last = parts[-1]
    cmd = stash.format(p=last.name) + f" && cp {OUT_DIR}/MANIFEST {REMOTE_DIR}/ && python3 bench/gpu_check.py"
    carry = [f"{OUT_DIR}/{last.name}", f"{OUT_DIR}/MANIFEST"] + [d for d in TEST_DATA if (ROOT / d).is_dir()]
    size = tree + sum(path_bytes(ROOT / c) for c in carry)
    calls.append((cmd, carry, size))
    return calls


def path_bytes(path: Path) -> int:
    return (
        path.stat().st_size
        if path.is_file()
        else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan-only", action="store_true", help="print the plan of the pieces already made")
    p.add_argument("--margin-mib", type=float, default=1.0, help="headroom under the 64 MiB per call")
    args = p.parse_args(argv)
    out = ROOT / OUT_DIR
    tree = tree_bytes()
    chunk = min(60 * 2**20, int(CALL_LIMIT - tree - args.margin_mib * 2**20))
    if args.plan_only:
        parts = sorted(out.glob("wheels.tar.part*"))
        if not parts:
            raise SystemExit(f"no pieces in {out}: run without --plan-only first")
    else:
        pkgs = wanted_wheels()
        print(
            f"{len(pkgs)} distributions the GPU machine lacks:",
            " ".join(f"{n}=={v}" for n, v in pkgs.items()),
        )
        wheels = download(pkgs, out / "cache")
        keep = {canon(n) for n in pkgs}
        wheels = [w for w in wheels if canon(w.name.split("-")[0]) in keep]
        print(f"{len(wheels)} wheels, {sum(w.stat().st_size for w in wheels) / 2**20:.1f} MiB")
        parts = pack(wheels, out, chunk)
    calls = plan(parts, tree)
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_check import EXPECTED_S, TIMEOUT_S

    check_s, cap_s = sum(EXPECTED_S.values()), sum(TIMEOUT_S.values())
    total_s = START_S + CALL_S * len(calls) + check_s
    print(f"\nworking tree {tree / 2**20:.2f} MiB travels with every call; piece <= {chunk / 2**20:.1f} MiB")
    print(f"{len(calls)} calls, in a row (the machine stays warm ~30 s after each):\n")
    for i, (cmd, carry, size) in enumerate(calls, 1):
        assert len(cmd) <= CMD_LIMIT and size <= CALL_LIMIT, (cmd, size)
        print(f"call {i}: carries {size / 2**20:.1f} MiB")
        print(f"  command: {cmd}")
        print(f"  carry:   {carry}")
    print(
        f"\nplanned machine time: start {START_S} s + {len(calls)} calls x {CALL_S} s + check {check_s} s "
        f"({', '.join(f'{k} {v}' for k, v in EXPECTED_S.items())}) = {total_s / 60:.1f} min of the 15"
    )
    print(
        f"hard cap of the last call: {cap_s} s (per-part timeouts: "
        f"{', '.join(f'{k} {v}' for k, v in TIMEOUT_S.items())}); pass timeout_s={cap_s + 30} with it;"
        f" at most {(START_S + CALL_S * len(calls) + cap_s) / 60:.1f} min in all"
    )
    print("files back: 2 (gpu_check.json, gpu_check.log); a rerun of the last call alone on the warm machine:"
          " python3 bench/gpu_check.py --parts tests train_step dali fp16")  # fmt: skip
    if total_s > 600:
        raise SystemExit("the plan exceeds 10 minutes of machine time")


if __name__ == "__main__":
    main()
