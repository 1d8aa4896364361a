"""Consolidate a run's DeepSpeed checkpoint (ZeRO 0-3) into one fp32 state dict.

    python -m pvt_dist.export RUN_DIR OUT.pth [--tag step_00001000] [--ema]

The output is a plain ``{name: fp32 tensor}`` dict, the format of the authors' released weights, so
``load_pretrained(build_model(...), OUT.pth)`` and the detection stage (``model.pretrained``) read it.
Every file is loaded with ``torch.load(weights_only=True)`` (the few DeepSpeed and numpy types a checkpoint
holds allowed), except by zero_to_fp32, which unpickles in full: before it runs, every ``.pt`` file of the
checkpoint is scanned for pickled globals and one outside that list is refused (``check_pickles``).
ZeRO 1-3 are merged from the fp32 master partitions of every rank (DeepSpeed's zero_to_fp32); ZeRO 0
keeps whole fp32 masters in its bf16/fp16 optimizer (named here), under fp32 the module weights.
The run's ``config.yaml`` is read for the model (only its ``model`` and ``optim`` sections, so runs
from older versions still export).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch

log = logging.getLogger("pvt_dist.export")


def _checkpoint_dir(run_dir: str) -> str:
    ckpt = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(ckpt):
        raise FileNotFoundError(f"{run_dir}: no checkpoints/ directory (is this a run directory?)")
    return ckpt


def _module_states_file(tag_dir: str) -> str:
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        path = os.path.join(tag_dir, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{tag_dir}: no DeepSpeed model states file")


def _run_model(run_dir: str) -> tuple[torch.nn.Module, dict]:
    """The model a run trained (fresh weights) and the run's resolved config as a dict."""
    import yaml

    from pvt_dist.models import build_model

    with open(os.path.join(run_dir, "config.yaml")) as f:
        cfg = yaml.safe_load(f)
    m = cfg["model"]
    return build_model(m["name"], num_classes=m["num_classes"], img_size=m["img_size"]), cfg


def _stage0_state_dict(run_dir: str, states: dict) -> dict[str, torch.Tensor]:
    """ZeRO-0 under bf16/fp16 keeps fp32 masters per optimizer group, unnamed, in group order.

    The groups are rebuilt exactly as training built them (``build_param_groups`` with the run's
    weight decay) to name each master; under fp32 the module weights are the masters.
    """
    from pvt_dist.engine.optim import build_param_groups

    module = {k: v.float().contiguous() for k, v in states["module"].items()}
    masters = (states.get("optimizer") or {}).get("fp32_groups")
    if masters is None:
        return module
    model, cfg = _run_model(run_dir)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = build_param_groups(model, cfg["optim"]["weight_decay"])
    if [len(g["params"]) for g in groups] != [len(m) for m in masters]:
        raise ValueError("ZeRO-0 checkpoint: optimizer groups do not match the run's model; cannot name them")
    for group, tensors in zip(groups, masters):
        for p, t in zip(group["params"], tensors):
            name = names[id(p)]
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(
                    f"ZeRO-0 checkpoint: master of {name} has shape {tuple(t.shape)}, not {tuple(p.shape)}"
                )
            module[name] = t.float().contiguous()
    return module


def consolidate(
    run_dir: str, tag: str | None = None, ema: bool = False
) -> tuple[dict[str, torch.Tensor], dict]:
    """Return (fp32 state dict, trainer_state of the checkpoint)."""
    from pvt_dist.engine.checkpoint import check_pickles, read_latest, read_trainer_state, safe_load

    ckpt = _checkpoint_dir(run_dir)
    tag = tag or read_latest(ckpt)
    if tag is None:
        raise FileNotFoundError(f"{ckpt}: no complete checkpoint (no `latest`)")
    tag_dir = os.path.join(ckpt, tag)
    if not os.path.isdir(tag_dir):
        raise FileNotFoundError(f"{tag_dir}: no such checkpoint")
    meta = read_trainer_state(ckpt, tag)
    check_pickles(tag_dir)  # zero_to_fp32 below unpickles DeepSpeed's files in full
    if ema:
        states = safe_load(_module_states_file(tag_dir))
        sd = states.get("ema")
        if sd is None:
            raise ValueError(f"{tag_dir}: this run kept no EMA weights (ema.enabled was false)")
        return {k: v.float().contiguous() for k, v in sd.items()}, meta

    if meta.get("zero_stage") == 0:
        states = safe_load(_module_states_file(tag_dir))
        return _stage0_state_dict(run_dir, states), meta

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(ckpt, tag=tag)
    return {k.removeprefix("module."): v.float().contiguous() for k, v in sd.items()}, meta


def verify(run_dir: str, sd: dict[str, torch.Tensor]) -> None:
    """The weights must load strictly into the model the run's config describes."""
    model, _ = _run_model(run_dir)
    model.load_state_dict(sd, strict=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="run directory of launch/train.py (holds config.yaml and checkpoints/)")
    p.add_argument("out", help="output .pth file")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the one `latest` names)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights instead")
    p.add_argument("--no-verify", action="store_true", help="skip the strict load into the run's model")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)

    try:
        sd, meta = consolidate(args.run_dir, args.tag, args.ema)
        if not args.no_verify:
            verify(args.run_dir, sd)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"export failed: {e}", file=sys.stderr)
        return 1
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    tmp = f"{args.out}.tmp.{os.getpid()}"
    torch.save(sd, tmp)
    os.replace(tmp, args.out)
    n = sum(v.numel() for v in sd.values())
    info = {"out": args.out, "step": meta.get("step"), "zero_stage": meta.get("zero_stage"), "params": n}
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
