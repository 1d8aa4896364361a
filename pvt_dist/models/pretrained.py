"""Loading the authors' released ``.pth`` files (and our own exports) into the models.

The authors ship plain fp32 state dicts (sometimes wrapped as ``{'model': sd}``). Loading adapts them
to the model at hand: position embeddings resized to its grid, the cls slot of ``pos_embed4`` dropped
for a backbone (``features_only``), and classification-only tensors (head, cls token, final norm)
left out where the model has no use for them.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from .pvt_v1 import PyramidVisionTransformer, resize_grid_pos_embed

log = logging.getLogger(__name__)

_WRAPPER_KEYS = ("model", "state_dict", "module", "model_state_dict")


@dataclass
class LoadReport:
    """What ``load_pretrained`` did: keys the model still lacks, keys it ignored, and adaptations."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)

    def __iter__(self):  # allows ``missing, unexpected = load_pretrained(...)``
        return iter((self.missing, self.unexpected))

    def summary(self) -> str:
        parts = [f"missing={self.missing}", f"unexpected={self.unexpected}"]
        if self.adapted:
            parts.append(f"adapted={self.adapted}")
        return "; ".join(parts)


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint file and return a flat ``{name: tensor}`` state dict."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained weights not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickles with arbitrary objects, truncated files, ...
        raise ValueError(f"{path}: cannot be read as a PyTorch weights file ({e})") from e
    for key in _WRAPPER_KEYS:
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict of tensors (or {{'model': state_dict}})")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _square_grid(n: int, key: str) -> tuple[int, int]:
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{key}: {n} grid positions is not a square grid; cannot resize it")
    return side, side


def _adapt_pos_embeds(sd: dict, model: PyramidVisionTransformer, report: LoadReport) -> None:
    for i, grid in enumerate(model.pos_grids, start=1):
        key = f"pos_embed{i}"
        if key not in sd:
            continue
        target = getattr(model, key)
        src = sd[key]
        if src.shape == target.shape:
            continue
        n_target_grid = grid[0] * grid[1]
        # A 224 checkpoint's stage-4 tensor is 49 grid slots + 1 cls slot; anything else here has no cls.
        src_prefix = 1 if i == 4 and not _is_square(src.shape[1]) and _is_square(src.shape[1] - 1) else 0
        cls, grid_pos = src[:, :src_prefix], src[:, src_prefix:]
        grid_pos = resize_grid_pos_embed(grid_pos, _square_grid(grid_pos.shape[1], key), grid)
        has_cls_slot = target.shape[1] == n_target_grid + 1
        if has_cls_slot and src_prefix == 0:
            raise ValueError(f"{key}: the checkpoint has no cls slot but the model needs one")
        sd[key] = torch.cat([cls, grid_pos], dim=1) if has_cls_slot else grid_pos
        report.adapted.append(f"{key} {tuple(src.shape)}->{tuple(sd[key].shape)}")


def _is_square(n: int) -> bool:
    return math.isqrt(n) ** 2 == n


def load_pretrained(model: nn.Module, path: str | os.PathLike, strict: bool = False) -> LoadReport:
    """Load weights from ``path`` into ``model`` and report what did not match.

    A head whose class count differs from the checkpoint's is kept at its fresh init (fine-tuning).
    With ``strict=True`` any missing or unexpected key is an error; shape mismatches always are.
    """
    sd = load_state_dict_file(path)
    report = LoadReport()
    own = model.state_dict()
    if isinstance(model, PyramidVisionTransformer):
        _adapt_pos_embeds(sd, model, report)
    fresh: set[str] = set()
    for key in list(sd):
        # Classification-only tensors (head, cls token, v1's final norm) that a backbone has no slot for.
        if key not in own and (key.startswith(("head.", "norm.")) or key == "cls_token"):
            report.adapted.append(f"dropped {key}")
            del sd[key]
        elif key.startswith("head.") and key in own and own[key].shape != sd[key].shape:
            report.adapted.append(f"kept fresh {key} (checkpoint {tuple(sd[key].shape)})")
            fresh.add(key)
            del sd[key]
    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
           for k, v in sd.items() if k in own and own[k].shape != v.shape]  # fmt: skip
    if bad:
        raise ValueError(f"{os.fspath(path)}: shape mismatch for " + "; ".join(bad))
    result = model.load_state_dict(sd, strict=False)
    report.missing = [k for k in result.missing_keys if k not in fresh]
    report.unexpected = list(result.unexpected_keys)
    if strict and (report.missing or report.unexpected):
        raise ValueError(f"{os.fspath(path)}: {report.summary()}")
    log.info("loaded %s into %s: %s", os.fspath(path), type(model).__name__, report.summary())
    return report
