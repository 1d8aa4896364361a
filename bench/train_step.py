"""The full DeepSpeed training step (forward, loss, backward, optimizer step) in images/s and MFU.

    python bench/train_step.py --models pvt_v2_b0 --batch 8 --size 224 --dtype fp32 --zero 0 1 2 3
    deepspeed --num_gpus 2 bench/train_step.py --models pvt_small --batch 128 --dtype bf16 --zero 2
    python bench/train_step.py --models pvt_large --batch 128 --dtype bf16 --peak-tflops 989 --json out.json

Data is excluded: one synthetic batch stays on the device. The engine is the one the trainer builds
(``build_deepspeed_config`` + ``build_optimizer`` from a ``TrainConfig``), so ZeRO stage, precision and
the CPU bf16 path (``cpu_bf16.fp32_gemm``) are exactly those of training. Every row of ours is paired
with timm's PVTv2 of the same size (same name for PVTv2, the v2 model of equal depth for PVT v1), and the
two engines take turns step by step, so the ratio holds even when the machine's load drifts.

MFU = 3 x forward FLOPs (``pvt_dist.models.summary.count_flops``, matmuls + convs + attention) x images
per second per device / peak FLOP/s. Peak: ``--peak-tflops`` (the datasheet value, e.g. 989 for an H100
SXM in bf16) or, by default, measured with a large matmul in the training dtype (fp32 GEMMs for bf16 on a
CPU without bf16 units, since that is what runs).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import sys
import time
import typing
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch.nn.attention import SDPBackend, sdpa_kernel

warnings.filterwarnings("ignore", category=FutureWarning)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pvt_dist.config import DeepSpeedOptions, TrainConfig, check_gpu_options, coerce  # noqa: E402
from pvt_dist.engine.cpu_bf16 import fp32_gemm, use_fp32_gemm  # noqa: E402
from pvt_dist.engine.ds_config import build_deepspeed_config  # noqa: E402
from pvt_dist.engine.optim import build_optimizer  # noqa: E402
from pvt_dist.models import build_model  # noqa: E402
from pvt_dist.models.summary import count_flops  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# timm has PVTv2 only; a PVT v1 variant is compared with the PVTv2 of the same stage depths.
TIMM_EQUIVALENT = {"pvt_tiny": "pvt_v2_b1", "pvt_small": "pvt_v2_b2", "pvt_medium": "pvt_v2_b3",
                   "pvt_large": "pvt_v2_b4"}  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak_tflops(device: torch.device, dtype: str) -> float:
    """Best of a few large square matmuls, in TFLOP/s (the dtype the model's GEMMs really run in)."""
    gemm_dtype = DTYPES[dtype]
    if use_fp32_gemm(dtype, device, "auto") or dtype == "fp16" and device.type == "cpu":
        gemm_dtype = torch.float32
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=gemm_dtype)
    b = torch.randn(n, n, device=device, dtype=gemm_dtype)
    best = float("inf")
    # Best of many short trials: on a shared CPU the least disturbed one is closest to the real peak.
    trials, reps = (8, 10) if device.type == "cuda" else (30, 1)
    for _ in range(trials):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - t0) / reps)
    return 2 * n**3 / best / 1e12


def build_timm(name: str, num_classes: int):
    import timm

    return timm.create_model(name, num_classes=num_classes, drop_path_rate=0.0)


class Runner:
    """One DeepSpeed engine on one synthetic batch; ``step()`` runs and times one training step."""

    def __init__(self, model, args, batch: int, dtype: str, stage: int, device, world: int, ds_over=()):
        import deepspeed

        cfg = TrainConfig()
        ds = cfg.deepspeed
        ds.zero_stage, ds.precision, ds.micro_batch, ds.grad_accum = stage, dtype, batch, args.grad_accum
        ds.global_batch = batch * world * args.grad_accum
        cfg.optim.impl = {"ds-fused": "fused", "torch": "torch", "torch-fused": "torch_fused"}.get(
            args.optim, "auto"
        )
        if args.bucket_mb:
            elems = int(args.bucket_mb * 2**20 / (4 if dtype == "fp32" else 2))
            ds.reduce_bucket_size = ds.allgather_bucket_size = elems
        if args.overlap_comm:
            ds.overlap_comm = True
        # --ds / --compare: deepspeed.* keys as in a config file, typed and validated like one.
        hints = typing.get_type_hints(DeepSpeedOptions)
        for item in (*args.ds, *ds_over):
            key, raw = item.split("=", 1)
            setattr(ds, key, coerce(yaml.safe_load(raw), hints[key], f"deepspeed.{key}"))
        check_gpu_options(ds)
        self.grad_accum = args.grad_accum
        ds_config = build_deepspeed_config(cfg, device.type)
        if args.no_mem_efficient_linear and stage == 3:
            ds_config["zero_optimization"]["memory_efficient_linear"] = False
        model = model.to(device)
        optimizer = build_optimizer(model, cfg, device)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        if args.compile:
            # Compiles the wrapped module in place; DeepSpeed's hooks stay outside the graph.
            self.engine.compile()
        self.engine.train()
        self.device = device
        self.fp32_gemm = use_fp32_gemm(dtype, device, "auto")
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 3, args.size, args.size, generator=gen)
        self.x = x.to(device=device, dtype=DTYPES[dtype])
        if args.channels_last:
            # Input only: DeepSpeed broadcasts parameters as byte views, which channels-last conv weights
            # (stride(-1) != 1) refuse; the convs inside the model get channels-last tokens anyway.
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.y = torch.randint(0, args.num_classes, (batch,), generator=gen).to(device)
        self.times: list[float] = []
        # "math" = attention as plain matmul + softmax: the baseline of the fused SDPA kernels.
        self.sdpa = (lambda: sdpa_kernel(SDPBackend.MATH)) if args.sdpa == "math" else contextlib.nullcontext

    def step(self, record: bool) -> None:
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(self.grad_accum):  # DeepSpeed steps the optimizer at the last micro batch
            with fp32_gemm(self.fp32_gemm), self.sdpa():
                logits = self.engine(self.x)
            loss = F.cross_entropy(logits.float(), self.y)
            self.engine.backward(loss)
            self.engine.step()
        sync(self.device)
        if record:
            self.times.append(time.perf_counter() - t0)

    def median(self) -> float:
        t = sorted(self.times)
        return t[len(t) // 2]

    def close(self) -> None:
        destroy = getattr(self.engine, "destroy", None)
        if destroy is not None:
            destroy()
        self.engine = None
        # A ZeRO-3 engine replaces torch.nn.functional.linear process-wide ("memory_efficient_linear");
        # put it back so that later rows measure their own configuration.
        from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as P

        if hasattr(P, "linear_bk"):
            torch.nn.functional.linear = P.linear_bk


def bench_config(args, name, batch, dtype, stage, device, world, peak) -> list[dict]:
    ours = lambda: build_model(name, num_classes=args.num_classes, img_size=args.size,
                               drop_path_rate=args.drop_path)  # fmt: skip
    if args.compare:  # one of our engines per value of one deepspeed.* key, the last one is the baseline
        key, values = args.compare.split("=", 1)
        impls = [(f"{key}={v}", name, ours, (f"{key}={v}",)) for v in values.split(",")]
    else:
        impls = [("pvt_dist", name, ours, ())]
        timm_name = name if name.startswith("pvt_v2") else TIMM_EQUIVALENT.get(name)
        if not args.no_timm and timm_name is not None:
            impls.append(("timm", timm_name, lambda: build_timm(timm_name, args.num_classes), ()))
    runners, flops = [], []
    for _, _, ctor, ds_over in impls:
        torch.manual_seed(0)
        model = ctor()
        flops.append(count_flops(model, args.size) * 3)  # fwd + bwd (2x fwd) per image
        runners.append(Runner(model, args, batch, dtype, stage, device, world, ds_over))
    # Interleaved: each implementation sees the same machine state, step after step. The order flips
    # every step because the first to run after the other's step pays its page faults (profiled).
    for i in range(args.warmup + args.steps):
        for r in runners if i % 2 == 0 else runners[::-1]:
            r.step(record=i >= args.warmup)
    rows = []
    base = runners[-1].median() if len(runners) > 1 else None
    for (impl, model_name, _, _), r, f in zip(impls, runners, flops):
        sec = r.median()
        ips = batch * args.grad_accum / sec  # per device
        rows.append(dict(
            impl=impl, model=model_name, batch=batch, size=args.size, dtype=dtype, zero=stage, world=world,
            device=str(device.type), ms_per_step=round(sec * 1e3, 2), img_per_s=round(ips * world, 2),
            tflops_per_device=round(f * ips / 1e12, 4), mfu=round(f * ips / 1e12 / peak, 4),
            gflops_fwd_per_img=round(f / 3e9, 3), speed_vs_timm=round(base / sec, 3) if base else None,
            compile=args.compile, channels_last=args.channels_last, optim=args.optim, sdpa=args.sdpa,
            mem_efficient_linear=not args.no_mem_efficient_linear,
        ))  # fmt: skip
        r.close()
    del runners
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def format_table(rows: list[dict]) -> str:
    w = max([9] + [len(r["impl"]) for r in rows])
    head = (f"{'impl':<{w}} {'model':<11} {'batch':>5} {'dtype':<5} {'zero':>4} {'world':>5} {'ms/step':>9} "
            f"{'img/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'vs last':>7}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in rows:
        vs = f"{r['speed_vs_timm']:.2f}" if r["speed_vs_timm"] is not None else "-"
        lines.append(
            f"{r['impl']:<{w}} {r['model']:<11} {r['batch']:>5} {r['dtype']:<5} {r['zero']:>4} "
            f"{r['world']:>5} {r['ms_per_step']:>9.1f} {r['img_per_s']:>9.1f} {r['tflops_per_device']:>8.3f} "
            f"{100 * r['mfu']:>5.1f}% {vs:>7}"
        )
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["pvt_v2_b0"])
    p.add_argument("--batch", nargs="+", type=int, default=[8], help="micro batch per device")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--dtype", nargs="+", default=["bf16"], choices=sorted(DTYPES))
    p.add_argument("--zero", nargs="+", type=int, default=[2], choices=[0, 1, 2, 3])
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--drop-path", type=float, default=0.0, help="ours; timm's baseline uses 0")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak; default: measured matmul")
    p.add_argument("--optim", default="auto", choices=["auto", "torch", "torch-fused", "ds-fused"],
                   help="auto = the engine's choice (torch AdamW fused=True on GPU, foreach on CPU); "
                   "ds-fused = DeepSpeed FusedAdam (JIT-built with nvcc)")  # fmt: skip
    p.add_argument("--compile", action="store_true", help="torch.compile the model (engine.compile())")
    p.add_argument("--channels-last", action="store_true", help="channels-last input images")
    p.add_argument("--sdpa", default="auto", choices=["auto", "math"],
                   help="auto: flash / mem-efficient on GPU, flash-for-CPU on CPU")  # fmt: skip
    p.add_argument("--overlap-comm", action="store_true", help="ZeRO overlap_comm=true (stage >= 1)")
    p.add_argument("--no-mem-efficient-linear", action="store_true",
                   help="ZeRO-3: keep torch's F.linear (DeepSpeed's swap defeats CPU bf16)")  # fmt: skip
    p.add_argument("--bucket-mb", type=float, default=None, help="ZeRO reduce/allgather bucket size in MiB")
    p.add_argument("--no-timm", action="store_true", help="skip the timm baseline rows")
    p.add_argument("--grad-accum", type=int, default=1, help="micro batches per optimizer step")
    p.add_argument("--ds", nargs="*", default=[], metavar="KEY=VALUE",
                   help="deepspeed.* config keys for every engine, e.g. reduce_dtype=bf16")  # fmt: skip
    p.add_argument("--compare", default=None, metavar="KEY=A,B",
                   help="instead of timm: one engine per value of a deepspeed.* key, interleaved; "
                   "'vs' is relative to the last value, e.g. reduce_dtype=fp32,bf16")  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--json", default=None, help="also write the rows (and the run's setup) here")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    args = p.parse_args(argv)

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    os.environ.setdefault(
        "TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / "build/torch_extensions")
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    from pvt_dist.cluster.distributed import init_distributed
    from pvt_dist.config import DistConfig

    env, device = init_distributed(DistConfig(timeout_s=600))
    world = env.world_size
    peak_by_dtype = {d: args.peak_tflops or measure_peak_tflops(device, d) for d in args.dtype}
    rows = []
    for name in args.models:
        for dtype in args.dtype:
            if dtype == "fp16" and device.type == "cpu":
                print("fp16: skipped (DeepSpeed refuses fp16 on CPU)", file=sys.stderr)
                continue
            for batch in args.batch:
                for stage in args.zero:
                    new = bench_config(args, name, batch, dtype, stage, device, world, peak_by_dtype[dtype])
                    rows += new
                    if env.rank == 0:  # progress, the full table comes at the end
                        print("\n".join(format_table(new).splitlines()[2:]), file=sys.stderr, flush=True)
    if env.rank == 0:
        load = os.getloadavg()
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} CPUs"
        print(f"\nDeepSpeed training step, {args.size}px, world {world}, {gpu}, "
              f"{torch.get_num_threads()} threads/rank, load avg {load[0]:.1f}; peak TFLOP/s "
              + ", ".join(f"{d} {v:.2f}" for d, v in peak_by_dtype.items())
              + (" (given)" if args.peak_tflops else " (measured matmul)"))  # fmt: skip
        print(format_table(rows))
        if args.json:
            setup = dict(vars(args), world=world, device=gpu, load_avg=load, peak_tflops=peak_by_dtype,
                         torch=torch.__version__)  # fmt: skip
            Path(args.json).write_text(json.dumps({"setup": setup, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
