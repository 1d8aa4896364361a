"""Top-1 / top-5 over the whole validation split, each real sample counted exactly once across ranks."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from pvt_dist.cluster import distributed as pdist


@torch.no_grad()
def evaluate(
    model: Callable[[torch.Tensor], torch.Tensor],
    loader: Iterable,
    device: torch.device,
    input_dtype: torch.dtype,
    observers: Sequence = (),
) -> dict[str, float]:
    """Run ``model`` over ``loader`` (padded slots carry label -1) and all-reduce the counts.

    Every rank must call this: under ZeRO-3 each forward gathers parameters collectively, and the
    loader gives every rank the same number of batches (padding fills the last ones).
    ``observers`` see every batch's real samples through ``update(logits [b, classes], labels [b],
    keys)`` (keys: the loader's sample names when it yields them, else None) and keep their counts in a
    float64 tensor ``totals`` on ``device``, which is summed over ranks here.
    Returns {"top1", "top5" (percent), "loss" (mean CE), "count" (real samples seen, all ranks)}.
    """
    module = getattr(model, "module", model)
    was_training = module.training
    module.eval()
    # [correct@1, correct@5, samples, summed loss]; float64 keeps counts exact far beyond ImageNet's 50k.
    stats = torch.zeros(4, dtype=torch.float64, device=device)
    for batch in loader:
        images, labels = batch[0], batch[1]
        keys = batch[2] if len(batch) > 2 else None
        images = images.to(device, non_blocking=True).to(input_dtype)  # [B, 3, H, W]
        labels = labels.to(device, non_blocking=True)  # [B], -1 = padding
        logits = model(images).float()  # [B, classes]
        valid = labels >= 0
        if not bool(valid.any()):
            continue
        logits, labels = logits[valid], labels[valid]
        if observers:
            kept = None if keys is None else [k for k, v in zip(keys, valid.tolist()) if v]
            for obs in observers:
                obs.update(logits, labels, kept)
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices.eq(labels[:, None])  # [b, k]
        stats[0] += hits[:, 0].sum()
        stats[1] += hits.any(dim=1).sum()
        stats[2] += labels.numel()
        stats[3] += F.cross_entropy(logits, labels, reduction="sum").double()
    pdist.all_reduce_sum(stats)
    for obs in observers:
        pdist.all_reduce_sum(obs.totals)
    module.train(was_training)
    n = max(stats[2].item(), 1.0)
    return {
        "top1": 100.0 * stats[0].item() / n,
        "top5": 100.0 * stats[1].item() / n,
        "loss": stats[3].item() / n,
        "count": int(stats[2].item()),
    }
