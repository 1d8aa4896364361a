"""Scoring classification weights over a shard split: what ``launch/evaluate.py`` runs.

Inputs are checked before any process group starts or any image is decoded (``EvalInputError``): the
shards exist and match their indexes, the weights hold a head whose class count matches the data, and
they load strictly into the named model. The images go through the training run's own validation path
(``build_loader(split="val")``, DALI or fallback) and ``evaluate()``, so every image is counted exactly
once on any number of ranks, and a run's export scores what the run's final validation reported.

ImageNet-ReaL (Beyer et al. 2020) labels come as the json list its authors publish: entry i is the list
of acceptable labels of validation image i (ILSVRC2012_val_{i+1:08d}); an empty list excludes the image.
A prediction is correct when it is in the list (top-5: any of the five); the mean runs over the images
with a non-empty list, as in timm's ``RealLabelsImagenet``.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass

import torch

IMAGENET_VAL_KEY = re.compile(r"ILSVRC2012_val_(\d+)$")
TRAILING_NUMBER = re.compile(r"(\d+)$")


class EvalInputError(ValueError):
    """Bad command-line input (missing shard, mismatched weights, unreadable labels): exit code 2."""


@dataclass
class EvalSettings:
    """Model and preprocessing of one evaluation (from the command line and/or a run's config.yaml)."""

    model: str
    """Registered model name (``pvt_small``, ``pvt_v2_b2``, ...)."""
    img_size: int
    """Resolution the model's position embeddings are built for (the crop size unless a config says)."""
    size: int
    """Side of the center crop."""
    crop_pct: float
    """The shorter side is resized to floor(size / crop_pct) before the center crop."""
    interpolation: str
    """Resize filter: bicubic, bilinear or nearest."""
    precision: str
    """fp32, bf16 or fp16 (fp16 needs a GPU): weights and inputs are cast to it, as the trainer does."""
    num_classes: int | None = None
    """Classes of the data; None: the weights' head decides (labels are still range-checked)."""
    mean: tuple[float, float, float] | None = None
    """Normalization mean (0-1 scale); None keeps the ImageNet default."""
    std: tuple[float, float, float] | None = None
    """Normalization std (0-1 scale); None keeps the ImageNet default."""
    cpu_bf16_math: str = "auto"
    """bf16 on CPU: fp32 GEMMs on bf16 tensors or native kernels (``deepspeed.cpu_bf16_math``)."""


def val_index(name: str) -> int:
    """Validation index of a loader sample name "shard.tar:key".

    ImageNet names count from 1 (ILSVRC2012_val_00000001 is index 0, the ReaL list's first entry);
    other keys ending in a number (fmnist_val_08083) are that number.
    """
    key = name.rsplit(":", 1)[-1]
    m = IMAGENET_VAL_KEY.search(key)
    if m:
        return int(m.group(1)) - 1
    m = TRAILING_NUMBER.search(key)
    if m is None:
        raise EvalInputError(f"--real-labels: sample key {key!r} carries no validation index")
    return int(m.group(1))


def read_real_labels(path: str) -> list[list[int]]:
    """ReaL json: a list with one list of acceptable labels per validation image."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise EvalInputError(f"--real-labels: {path} does not exist") from None
    except (OSError, json.JSONDecodeError) as e:
        raise EvalInputError(f"--real-labels: {path} is not readable JSON: {e}") from None
    if not isinstance(data, list) or not all(
        isinstance(x, list) and all(isinstance(v, int) for v in x) for x in data
    ):
        raise EvalInputError(f"--real-labels: {path} must be a list of lists of integer labels")
    return data


class RealLabelCounts:
    """Top-1/top-5 against ImageNet-ReaL's label sets; totals = [hits@1, hits@5, scored images]."""

    def __init__(self, real: list[list[int]], device: torch.device):
        self.real = [frozenset(x) for x in real]
        self.totals = torch.zeros(3, dtype=torch.float64, device=device)

    def update(self, logits: torch.Tensor, labels: torch.Tensor, keys: list[str] | None) -> None:
        if keys is None:
            raise RuntimeError("ReaL labels need the loader's sample names (return_keys=True)")
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices.tolist()  # [b, 5]
        for name, preds in zip(keys, top5):
            idx = val_index(name)
            if idx >= len(self.real):
                raise EvalInputError(
                    f"--real-labels: sample {name} has validation index {idx}, the file has {len(self.real)}"
                )
            accepted = self.real[idx]
            if not accepted:
                continue  # ReaL found no acceptable label: the image is left out
            self.totals[0] += preds[0] in accepted
            self.totals[1] += any(p in accepted for p in preds)
            self.totals[2] += 1

    def result(self) -> dict:
        hits1, hits5, n = self.totals.tolist()
        return {
            "real_top1": 100.0 * hits1 / max(n, 1.0),
            "real_top5": 100.0 * hits5 / max(n, 1.0),
            "real_count": int(n),
        }


class PerClassCounts:
    """Per true class: totals = [[images], [top-1 hits], [top-5 hits]], each [classes]."""

    def __init__(self, num_classes: int, device: torch.device):
        self.totals = torch.zeros(3, num_classes, dtype=torch.float64, device=device)

    def update(self, logits: torch.Tensor, labels: torch.Tensor, keys) -> None:
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(labels[:, None])  # [b, k]
        ones = torch.ones_like(labels, dtype=torch.float64)
        self.totals[0].index_add_(0, labels, ones)
        self.totals[1].index_add_(0, labels, hits[:, 0].double())
        self.totals[2].index_add_(0, labels, hits.any(dim=1).double())

    def write_csv(self, path: str, class_names: list[str] | None) -> None:
        count, top1, top5 = self.totals.tolist()
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["class", "name", "count", "top1_correct", "top1", "top5"])
            for c, (n, h1, h5) in enumerate(zip(count, top1, top5)):
                name = class_names[c] if class_names and c < len(class_names) else ""
                pct = [f"{100.0 * h / n:.4f}" if n else "" for h in (h1, h5)]
                w.writerow([c, name, int(n), int(h1), *pct])
        os.replace(tmp, path)


def manifest_classes(spec: str) -> list[str] | None:
    """Class names of a shard directory's manifest.json (None for patterns, URLs, older manifests)."""
    from pvt_dist.data.index import MANIFEST, read_manifest

    path = os.path.join(os.path.expanduser(spec), MANIFEST)
    if "::" in spec or not os.path.isfile(path):
        return None
    classes = read_manifest(path).get("classes")
    return list(classes) if isinstance(classes, list) else None


def build_scored_model(settings: EvalSettings, weights: str) -> tuple[torch.nn.Module, int]:
    """The named model with ``weights`` loaded strictly; returns (model, classes of its head).

    Raises EvalInputError for an unreadable file, a file without a classification head, a class count
    other than the data's, or weights of another architecture.
    """
    from pvt_dist.models import build_model, load_pretrained, load_state_dict_file

    try:
        sd = load_state_dict_file(weights)
    except (FileNotFoundError, ValueError) as e:
        raise EvalInputError(f"--weights: {e}") from None
    head = sd.get("head.weight")
    if head is None or head.dim() != 2:
        raise EvalInputError(
            f"--weights: {weights} has no classification head (head.weight): a backbone or detector export "
            "cannot be scored on classification"
        )
    classes = int(head.shape[0])
    if settings.num_classes is not None and classes != settings.num_classes:
        raise EvalInputError(
            f"--weights: {weights} has a {classes}-class head but the data has {settings.num_classes} classes"
        )
    try:
        model = build_model(settings.model, num_classes=classes, img_size=settings.img_size)
        load_pretrained(model, weights, strict=True)
    except (ValueError, TypeError, RuntimeError) as e:
        raise EvalInputError(f"--weights: {weights} does not fit model {settings.model!r}: {e}") from None
    return model, classes


def settings_from(args) -> EvalSettings:
    """Command-line options over a run's resolved config (``--config``) over the defaults."""
    from pvt_dist.config import ConfigError, load_config

    base = dict(img_size=None, size=224, crop_pct=0.875, interpolation="bicubic", precision="fp32")
    if args.config:
        try:
            cfg = load_config(args.config)
        except (ConfigError, FileNotFoundError) as e:
            raise EvalInputError(f"--config: {e}") from None
        d = cfg.data
        base = dict(
            model=cfg.model.name, img_size=cfg.model.img_size, size=d.val_size, crop_pct=d.crop_pct,
            interpolation=d.interpolation, precision=cfg.deepspeed.precision, num_classes=d.num_classes,
            mean=d.mean, std=d.std, cpu_bf16_math=cfg.deepspeed.cpu_bf16_math,
        )  # fmt: skip
    for opt in ("model", "size", "crop_pct", "interpolation", "precision", "num_classes"):
        if getattr(args, opt) is not None:
            base[opt] = getattr(args, opt)
    if base.get("model") is None:
        raise EvalInputError("--model: required without --config (e.g. --model pvt_small)")
    if args.img_size is not None:
        base["img_size"] = args.img_size
    elif base["img_size"] is None:
        base["img_size"] = base["size"]
    if not 0.0 < base["crop_pct"] <= 1.0:
        raise EvalInputError(f"--crop-pct: must be in (0, 1], got {base['crop_pct']}")
    return EvalSettings(**base)


def data_config(settings: EvalSettings, args, classes: int):
    """The validation DataConfig: the run's data section (when given) with the evaluated shards."""
    from pvt_dist.config import load_config
    from pvt_dist.data import DataConfig

    data = load_config(args.config).data if args.config else DataConfig()
    changes = dict(
        train_shards="", val_shards=args.shards, val_samples=args.samples, num_classes=classes,
        val_size=settings.size, crop_pct=settings.crop_pct, interpolation=settings.interpolation,
        rand_augment=None, random_erase=0.0, mixup=0.0, cutmix=0.0,
    )  # fmt: skip
    for opt in ("backend", "num_threads"):
        if getattr(args, opt) is not None:
            changes[opt] = getattr(args, opt)
    if settings.mean is not None:
        changes.update(mean=settings.mean, std=settings.std)
    try:
        return data.replace(**changes)
    except ValueError as e:
        raise EvalInputError(str(e)) from None


def evaluate_weights(args) -> dict:
    """Check every input, then score ``args.weights`` on ``args.shards`` over all ranks of the job.

    Returns the metrics (rank 0 also writes --json / --per-class); raises EvalInputError on bad input
    before any process group starts.
    """
    from pvt_dist.cluster import distributed as pdist
    from pvt_dist.config import DistConfig
    from pvt_dist.data import build_loader
    from pvt_dist.data.index import resolve_shards
    from pvt_dist.engine.cpu_bf16 import fp32_gemm, use_fp32_gemm
    from pvt_dist.engine.evaluate import evaluate

    settings = settings_from(args)
    if settings.num_classes is None and args.shards:
        names = manifest_classes(args.shards)
        settings.num_classes = len(names) if names else None
    try:
        shards = resolve_shards(args.shards, "--shards", "val", args.samples)
    except (OSError, ValueError) as e:
        raise EvalInputError(str(e)) from None
    real = read_real_labels(args.real_labels) if args.real_labels else None
    model, classes = build_scored_model(settings, args.weights)
    data = data_config(settings, args, classes)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[settings.precision]

    if settings.precision == "fp16" and not torch.cuda.is_available():
        raise EvalInputError("--precision: fp16 needs a GPU; use bf16 or fp32 on CPU")
    env = pdist.detect_env()
    if env.world_size > 1:
        env, device = pdist.init_distributed(DistConfig(backend=args.dist_backend), env)
    else:
        device = pdist.device_for(env)
    model.to(device=device, dtype=dtype)
    loader = build_loader(
        data, "val", env.rank, env.world_size, micro_batch=args.batch, device=device, return_keys=True
    )
    observers = []
    per_class = PerClassCounts(classes, device)
    observers.append(per_class)
    real_counts = RealLabelCounts(real, device) if real is not None else None
    if real_counts is not None:
        observers.append(real_counts)
    with fp32_gemm(use_fp32_gemm(settings.precision, device, settings.cpu_bf16_math)):
        res = evaluate(model, loader, device, dtype, observers)
    if res["count"] != shards.num_samples:
        raise RuntimeError(f"evaluation saw {res['count']} images, the split has {shards.num_samples}")
    res.update(
        model=settings.model, weights=os.path.abspath(args.weights), shards=args.shards,
        precision=settings.precision, size=settings.size, crop_pct=settings.crop_pct,
        interpolation=settings.interpolation, world_size=env.world_size,
    )  # fmt: skip
    if real_counts is not None:
        res.update(real_counts.result())
    if env.rank == 0:
        if args.per_class:
            per_class.write_csv(args.per_class, manifest_classes(args.shards))
        if args.json:
            tmp = f"{args.json}.tmp.{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(res, f, indent=1)
            os.replace(tmp, args.json)
    pdist.cleanup()
    res["rank"] = env.rank
    return res
