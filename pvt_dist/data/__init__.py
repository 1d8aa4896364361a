"""Input pipeline: WebDataset shards decoded by DALI (GPU or CPU) or webdataset+PIL, Mixup/CutMix.

    cfg = DataConfig(train_shards="data/fashion_mnist", val_shards="data/fashion_mnist", num_classes=10)
    loader = build_loader(cfg, split="train", rank=r, world_size=w, seed=s, micro_batch=b, device=dev)
    for images, labels in loader: ...  # float [B,3,H,W] normalized / int64 [B] on dev (val pads with -1)
    mix = build_mixup(cfg)  # None, or (images, labels) -> (images, soft targets [B,num_classes])

Modules: config (DataConfig); make_shards (shard writer + CLI) with its sources imagenet and
fashion_mnist; index (shard specs, index/manifest checks); loader (rank plan, epochs, resume state);
dali_pipeline and fallback (the two backends); stream (webdataset streams: remote shards, fallback);
mixup.
"""

from pvt_dist.data.config import DataConfig
from pvt_dist.data.loader import build_loader
from pvt_dist.data.mixup import build_mixup

__all__ = ["DataConfig", "build_loader", "build_mixup"]
