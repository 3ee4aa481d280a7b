"""Networks: backbones (registry), projector/predictor heads, the online/target pair and its EMA update."""

from reid_ssl.models.backbones import BACKBONES, BackboneSpec, ResNetTrunk, build_backbone
from reid_ssl.models.heads import mlp_head
from reid_ssl.models.ssl import SSLModel, random_resize, unwrap, update_target

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "ResNetTrunk",
    "SSLModel",
    "build_backbone",
    "mlp_head",
    "random_resize",
    "unwrap",
    "update_target",
]
