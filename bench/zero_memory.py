"""Per-rank bytes of parameters, gradients and optimizer states under ZeRO 0-3, measured from the engine.

    python bench/zero_memory.py                                  # PVT-Large, bf16, worlds 1 and 2, stages 0-3
    python bench/zero_memory.py --model pvt_small --dtype fp32 --worlds 2 --json build/zero_mem.json

Each world size runs in its own process group (``torch.distributed.run``, gloo on CPU). For every stage
the engine the trainer would build does one real step on one image, and the bytes are read from the
tensors it holds on each rank, counting every storage once (flat buffers and the views into them):

- params: the 16-bit (or fp32) model weights this rank keeps: ``p.data`` and, under ZeRO-3, ``p.ds_tensor``;
- grads: after backward, before the step: ``p.grad`` plus the optimizer's gradient buffers (any attribute
  named ``*grad*``/``ipg*``: averaged gradients, ZeRO-3's flat partition buffer, reduce buckets);
- master: the fp32 weights the inner optimizer updates (none of their own for fp32 training at stage 0);
- adam: the inner optimizer's state (exp_avg, exp_avg_sq, step).

Theory (Rajbhandari et al., mixed precision, Psi params, N ranks): params 2Psi / (N at stage 3), grads 2Psi
/ (N at stages 2-3), master + Adam 12Psi / (N at stages 1-3); fp32 training uses 4/4/8 bytes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore", category=FutureWarning)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pvt_dist.cluster.plan import zero_state_bytes  # noqa: E402  (the same arithmetic as --plan)
from pvt_dist.config import DistConfig, TrainConfig  # noqa: E402
from pvt_dist.engine.cpu_bf16 import fp32_gemm, use_fp32_gemm  # noqa: E402
from pvt_dist.engine.ds_config import build_deepspeed_config  # noqa: E402
from pvt_dist.engine.optim import build_optimizer  # noqa: E402
from pvt_dist.models import build_model  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
CATEGORIES = ("params", "grads", "master", "adam")  # = pvt_dist.cluster.plan.STATE_NAMES


def _tensors(obj, depth: int = 0):
    """Tensors inside nested lists / tuples / dicts (not inside arbitrary objects)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 4 and isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v, depth + 1)
    elif depth < 4 and isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v, depth + 1)


def storage_bytes(tensors, seen: set[int]) -> int:
    """Bytes of the distinct storages behind ``tensors`` not yet in ``seen`` (which is updated)."""
    total = 0
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


def measure_stage(model_name: str, size: int, dtype: str, stage: int, world: int) -> dict:
    import deepspeed

    cfg = TrainConfig()
    ds = cfg.deepspeed
    ds.zero_stage, ds.precision, ds.micro_batch, ds.grad_accum, ds.global_batch = stage, dtype, 1, 1, world
    torch.manual_seed(0)
    model = build_model(model_name, num_classes=1000, img_size=size, drop_path_rate=0.0)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=build_deepspeed_config(cfg))
    x = torch.randn(1, 3, size, size, dtype=DTYPES[dtype])
    y = torch.zeros(1, dtype=torch.long)
    with fp32_gemm(use_fp32_gemm(dtype, torch.device("cpu"), "auto")):
        logits = engine(x)
    engine.backward(F.cross_entropy(logits.float(), y))

    opt = engine.optimizer
    seen: set[int] = set()
    module_params = list(engine.module.parameters())
    out = {"params": storage_bytes([getattr(p, "ds_tensor", None) for p in module_params], seen)}
    out["params"] += storage_bytes([p.data for p in module_params], seen)
    grad_bufs = [p.grad for p in module_params]
    for name, value in vars(opt).items():
        if "grad" in name.lower() or name.startswith("ipg"):
            grad_bufs += list(_tensors(value))
    out["grads"] = storage_bytes(grad_bufs, seen)
    engine.step()  # Adam's moments exist only after the first step
    inner = getattr(opt, "optimizer", opt)
    # The state is keyed by the tensors the optimizer updates; ZeRO-3 empties param_groups after a step.
    masters = [p for g in inner.param_groups for p in g["params"]] + list(inner.state)
    out["master"] = storage_bytes(masters, seen)
    out["adam"] = storage_bytes([t for s in inner.state.values() for t in _tensors(s)], seen)
    out.update(n_params=n_params, optimizer=type(opt).__name__)
    engine.destroy()
    return out


def child(args) -> None:
    """One rank of one world size: measure every stage, rank 0 writes the rows."""
    from pvt_dist.cluster.distributed import init_distributed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    env, _ = init_distributed(DistConfig(timeout_s=600))
    rows = []
    for stage in args.zero:
        m = measure_stage(args.model, args.size, args.dtype, stage, env.world_size)
        per_rank = [None] * env.world_size
        torch.distributed.all_gather_object(per_rank, m)
        th = zero_state_bytes(m["n_params"], args.dtype, stage, env.world_size)
        for rank, r in enumerate(per_rank):
            row = dict(model=args.model, dtype=args.dtype, zero=stage, world=env.world_size, rank=rank,
                       n_params=r["n_params"], optimizer=r["optimizer"])  # fmt: skip
            for c in CATEGORIES:
                row[f"{c}_mb"] = round(r[c] / 2**20, 1)
                row[f"{c}_theory_mb"] = round(th[c] / 2**20, 1)
            row["total_mb"] = round(sum(r[c] for c in CATEGORIES) / 2**20, 1)
            row["total_theory_mb"] = round(sum(th.values()) / 2**20, 1)
            rows.append(row)
    if env.rank == 0:
        Path(args.child_json).write_text(json.dumps(rows))


def format_table(rows: list[dict]) -> str:
    head = f"{'world':>5} {'rank':>4} {'zero':>4} " + " ".join(
        f"{c + ' MB':>17}" for c in (*CATEGORIES, "total")
    )
    lines = [head, f"{'':>15}" + " ".join(f"{'meas / theory':>17}" for _ in range(5)), "-" * len(head)]
    for r in rows:
        cells = [f"{r[c + '_mb']:>8.1f}/{r[c + '_theory_mb']:<8.1f}" for c in (*CATEGORIES, "total")]
        lines.append(f"{r['world']:>5} {r['rank']:>4} {r['zero']:>4} " + " ".join(cells))
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="pvt_large")
    p.add_argument("--size", type=int, default=224, help="PVT v1's position embeddings depend on it")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--zero", nargs="+", type=int, default=[0, 1, 2, 3], choices=[0, 1, 2, 3])
    p.add_argument("--worlds", nargs="+", type=int, default=[1, 2])
    p.add_argument("--json", default=None)
    p.add_argument("--child-json", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_json:
        child(args)
        return []
    rows = []
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / "build/torch_extensions"))
    env["OMP_NUM_THREADS"] = "1"
    for world in args.worlds:
        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                   __file__, "--model", args.model, "--size", str(args.size), "--dtype", args.dtype,
                   "--zero", *map(str, args.zero), "--child-json", tmp.name]  # fmt: skip
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"world {world} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
            rows += json.loads(Path(tmp.name).read_text())
    n = rows[0]["n_params"]
    print(f"{args.model} ({n:,} params, {args.size}px), {args.dtype}, per-rank MB measured / theoretical")
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
