"""PVT v1 and PVTv2 model family, faithful to the authors' released weights."""

from . import pvt_v1, pvt_v2  # noqa: F401  (registers the variants)
from .pretrained import load_pretrained, load_state_dict_file
from .pvt_v1 import PyramidVisionTransformer
from .pvt_v2 import PyramidVisionTransformerV2
from .registry import build_model, list_models, register_model

__all__ = [
    "PyramidVisionTransformer",
    "PyramidVisionTransformerV2",
    "build_model",
    "list_models",
    "load_pretrained",
    "load_state_dict_file",
    "register_model",
]
