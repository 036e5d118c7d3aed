"""hpkit: learn, reproduce and extend "Leveraging Hidden Positives for Unsupervised Semantic
Segmentation" (Seong et al., CVPR 2023).

The package in layers, each importing only from those below it::

    hpkit/lessons/    figures, the GHP explorer, comparisons, ablations, the notebooks' workspace
    hpkit/pipeline/   config, datasets, hp_step (one training step), train, evaluate, segment, probes
    hpkit/backbones/  frozen ViTs, weight files, attention alignment, backbone pretraining
    hpkit/data/       synthetic scenes, your photos, COCO-Stuff, Cityscapes, Potsdam
    hpkit/method/     the paper on plain tensors (heads, pools, positives, the objective; reference.py)
    hpkit/_util.py    seeded generators, device, autocast, atomic writes

Data flow of one step (rows are image-major everywhere, row = b * P + y * w + x, P = h * w)::

    images (B,3,H,W) in [0,1] --load_backbone--> feats (B,C,h,w), attn_logits (B,heads,P,P)
    feats --SegmentationHead--> s (B,D,h,w) --ProjectionHead--> z (N,D)
    feats --MomentumHead--> s' ; ReferencePools -> Q^ag (M,C), Q^sp (M,D)
    s, attn_logits --local_mix--> s_mix --ProjectionHead--> z_mix
    hp_objective(z, f, s', Q^ag, Q^sp, z_mix=z_mix) -> scalar loss

The names below are loaded on first use, so ``import hpkit`` (and the CLI's ``--help``) stays quick.
"""

from __future__ import annotations

from hpkit._lazy import lazy_names

__version__ = "0.1.0"

#: public name -> the module that defines it
_API = {
    # the method (hpkit.method): the paper on plain tensors
    "criterion": "method.global_positives", "global_hidden_positives": "method.global_positives",
    "positive_mask": "method.global_positives",
    "MomentumHead": "method.heads", "ProjectionHead": "method.heads", "SegmentationHead": "method.heads",
    "from_rows": "method.heads", "to_rows": "method.heads",
    "local_mix": "method.local_positives", "local_weights": "method.local_positives",
    "mix_neighbours": "method.local_positives",
    "consistency_regularizer": "method.objective", "hp_objective": "method.objective",
    "lambda_schedule": "method.objective", "self_contrastive_loss": "method.objective",
    "ReferencePools": "method.pools", "collect_patch_bank": "method.pools", "sample_patches": "method.pools",
    # backbones
    "BACKBONES": "backbones.vit", "BackboneWeightsError": "backbones.vit", "FrozenViT": "backbones.vit",
    "load_backbone": "backbones.vit",
    # data
    "SyntheticScenes": "data.synthetic", "ImageFolder": "data.folder", "scan_folder": "data.folder",
    "write_scene_folder": "data.synthetic", "write_sample_photos": "data.samples",
    # the pipeline
    "Config": "pipeline.config", "get_config": "pipeline.config", "override": "pipeline.config",
    "build_dataset": "pipeline.datasets",
    "hp_step": "pipeline.step", "TrainingDiverged": "pipeline.step",
    "train": "pipeline.train", "load_run": "pipeline.checkpoint", "TrainedRun": "pipeline.checkpoint",
    "evaluate": "pipeline.evaluate", "segment": "pipeline.inference", "Segmentation": "pipeline.inference",
    "crf_available": "pipeline.crf",
}

#: modules a learner reaches from the top: ``hpkit.reference`` is Eq. 1-11 written to be read
_MODULES = {"reference": "method.reference", "lessons": "lessons"}

__all__ = sorted([*_API, *_MODULES])


__getattr__, __dir__ = lazy_names(__name__, globals(), _API, _MODULES)
