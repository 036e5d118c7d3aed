"""hpkit: learn, reproduce and extend "Leveraging Hidden Positives for Unsupervised Semantic
Segmentation" (Seong et al., CVPR 2023).

Data flow (rows are image-major everywhere, row = b * P + y * w + x, P = h * w)::

    images (B,3,H,W) in [0,1] --load_backbone--> feats (B,C,h,w), attn_logits (B,heads,P,P)
    feats --SegmentationHead--> s (B,D,h,w) --ProjectionHead--> z (N,D)
    feats --MomentumHead--> s' ; ReferencePools -> Q^ag (M,C), Q^sp (M,D)
    s, attn_logits --local_mix--> s_mix --ProjectionHead--> z_mix
    hp_objective(z, f, s', Q^ag, Q^sp, z_mix=z_mix) -> scalar loss
"""

from hpkit.backbones.vit import BACKBONES, BackboneWeightsError, FrozenViT, load_backbone
from hpkit.method.global_positives import criterion, global_hidden_positives, positive_mask
from hpkit.method.heads import MomentumHead, ProjectionHead, SegmentationHead, from_rows, to_rows
from hpkit.method.local_positives import local_mix, local_weights, mix_neighbours
from hpkit.method.objective import consistency_regularizer, hp_objective, lambda_schedule, self_contrastive_loss
from hpkit.method.pools import ReferencePools, collect_patch_bank, sample_patches
from hpkit.pipeline.config import Config, get_config, override
from hpkit.pipeline.inference import segment  # the function ``hpkit.segment(image, run_dir)``; its module stays importable

__version__ = "0.1.0"

__all__ = [
    "BACKBONES", "BackboneWeightsError", "FrozenViT", "load_backbone",
    "criterion", "global_hidden_positives", "positive_mask",
    "MomentumHead", "ProjectionHead", "SegmentationHead", "from_rows", "to_rows",
    "local_mix", "local_weights", "mix_neighbours",
    "consistency_regularizer", "hp_objective", "lambda_schedule", "self_contrastive_loss",
    "ReferencePools", "collect_patch_bank", "sample_patches",
    "Config", "get_config", "override", "segment",
]
