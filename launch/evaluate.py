"""Top-1 / top-5 of classification weights over a whole shard split, each image counted exactly once.

    python launch/evaluate.py --weights W.pth --shards S [--config RUN/config.yaml]
        [--model NAME --size 224 --crop-pct 0.875 --interpolation bicubic]
    torchrun --nproc_per_node 8 launch/evaluate.py ...     # or deepspeed / srun: any number of ranks

W: a stage-1 export (python -m pvt_dist.export RUN OUT [--ema]) or the authors' .pth. S: a shard
directory (its manifest's val split), pattern or URL. With --config the model and the preprocessing come
from a run's resolved config.yaml (options given on the command line win). Exit codes: 0 done,
2 bad input (reported before any image is read).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

EXIT_OK, EXIT_INPUT = 0, 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="state dict file: export, EMA export or authors' .pth")
    p.add_argument("--shards", required=True, help="validation shards (directory, pattern or URL)")
    p.add_argument("--config", default=None, help="a run's resolved config.yaml: model + preprocessing")
    p.add_argument("--model", default=None, help="model name (default: the config's)")
    p.add_argument("--img-size", type=int, default=None, help="model resolution (default: config or --size)")
    p.add_argument("--size", type=int, default=None, help="center-crop side (default 224 / config)")
    p.add_argument("--crop-pct", type=float, default=None, help="resize shorter side to size/crop_pct")
    p.add_argument("--interpolation", default=None, choices=["bicubic", "bilinear", "nearest"])
    p.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"],
                   help="default: the run's deepspeed.precision with --config, else fp32")  # fmt: skip
    p.add_argument("--num-classes", type=int, default=None, help="classes of the data (default: manifest)")
    p.add_argument("--samples", type=int, default=None, help="images in the split (remote shards only)")
    p.add_argument("--batch", type=int, default=64, help="images per rank per forward")
    p.add_argument("--backend", default=None, choices=["dali", "fallback"], help="data backend")
    p.add_argument("--num-threads", type=int, default=None, help="decode threads per rank")
    p.add_argument("--dist-backend", default="auto", choices=["auto", "nccl", "gloo"])
    p.add_argument("--real-labels", default=None, help="ImageNet-ReaL json (labels by validation index)")
    p.add_argument("--per-class", default=None, help="write per-class counts and accuracy to this CSV")
    p.add_argument("--json", default=None, help="write the metrics to this JSON file")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by deepspeed's launcher")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    from pvt_dist.engine.classify_eval import EvalInputError, evaluate_weights

    try:
        res = evaluate_weights(args)
    except EvalInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INPUT
    if res.pop("rank") == 0:
        line = f"{res['model']} top-1 {res['top1']:.2f}% top-5 {res['top5']:.2f}% ({res['count']} images"
        line += f", {res['world_size']} rank{'s' if res['world_size'] > 1 else ''}, {res['precision']})"
        if "real_top1" in res:
            line += f" | ReaL top-1 {res['real_top1']:.2f}% top-5 {res['real_top5']:.2f}%"
            line += f" ({res['real_count']} images with ReaL labels)"
        print(line, flush=True)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
