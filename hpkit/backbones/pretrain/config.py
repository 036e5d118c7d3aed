"""The settings of a pretraining run (:class:`PretrainConfig`), the checkpoint's name, and the
settings that may change between a run and its resumption."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from hpkit.backbones.vit import BACKBONES

__all__ = ["PretrainConfig", "CHECKPOINT", "Terms", "trains_teacher"]

CHECKPOINT = "checkpoint.pt"
_TINY = BACKBONES["random_tiny"]
# Settings that may change between a run and its resumption (everything else must match).
_RUN_ONLY = ("device", "num_workers", "checkpoint_every", "amp")


@dataclass
class PretrainConfig:
    """Everything a DINO pretraining run depends on (defaults: about an hour on 2 idle CPU cores).

    Schedules are given in epochs and evaluated per step; ``epochs`` sets the length that the
    cosine schedules span (``pretrain(max_steps=...)`` can stop earlier).
    """

    # Architecture: must equal BACKBONES["random_tiny"] to load with load_backbone("random_tiny", weights=...).
    patch_size: int = 8
    embed_dim: int = 192
    depth: int = 6
    num_heads: int = 3
    img_size: int = 224  # position-embedding grid = img_size / patch_size (28 x 28), interpolated per crop size
    drop_path_rate: float = 0.0  # stochastic depth of the student (DINO ViT-S: 0.1); a short run underfits
    # Data: "synthetic" (hpkit.data.SyntheticScenes, train split) or "folder" (hpkit.data.ImageFolder at root).
    dataset: str = "synthetic"
    root: str | None = None
    num_images: int | None = 1000  # synthetic: number of scenes; folder: at most this many (None: all)
    image_size: int = 128  # side of the source images (synthetic scenes are rendered at this size)
    data_seed: int = 0  # synthetic: SyntheticScenes(seed=...); hpkit's HP training uses the same train split
    # Multi-crop (sizes multiples of patch_size).
    global_crop_size: int = 96
    global_crop_scale: tuple[float, float] = (0.4, 1.0)
    num_local_crops: int = 4
    local_crop_size: int = 48
    local_crop_scale: tuple[float, float] = (0.1, 0.4)
    # Photometric augmentation (DINO's, blur weakened for textures; see the package docstring).
    jitter: tuple[float, float, float, float] = (0.2, 0.2, 0.1, 0.02)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.5
    grayscale_p: float = 0.05
    blur_sigma: tuple[float, float] = (0.1, 0.8)
    blur_p: tuple[float, float, float] = (0.2, 0.1, 0.2)  # global 1, global 2, local
    solarize_p: float = 0.2  # second global crop only, as DINO
    # DINO head: MLP -> L2-normalised bottleneck -> weight-normalised linear layer to out_dim prototypes.
    # 4096 prototypes (DINO: 65536 for ImageNet; small-data setups use ~4096): the last layer costs
    # 128 x 4096 multiply-adds per crop, <1 % of the ViT, and K above the number of images lets the
    # teacher tell every image apart; the softmax temperatures are tuned for K in the thousands.
    out_dim: int = 4096
    hidden_dim: int = 512
    bottleneck_dim: int = 128
    norm_last_layer: bool = True  # fix the weight-norm gain g = 1 (DINO's default for stability)
    freeze_last_layer: int = 1  # epochs during which the prototypes get no update
    # Loss.
    warmup_teacher_temp: float = 0.04  # linear warm-up from this to teacher_temp (long runs: 0.04 -> 0.07)
    teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0
    student_temp: float = 0.1
    center_momentum: float = 0.9
    # Dense (patch-level) self-distillation, hpkit's addition (0 disables: plain DINO). Every student
    # patch token predicts the teacher's patch token at the same image point in each other global
    # crop (the crops' boxes give the correspondence), through a second DINO head with its own
    # center; the loss adds dense_weight times this term.
    dense_weight: float = 0.0
    dense_out_dim: int = 1024
    # Weight of the image-level DINO term (class tokens, all crops). 0 switches it off: with
    # dense_objective "vicreg" the backbone then learns from the dense term alone, only the two
    # global crops are encoded, and the teacher is the EMA of the student.
    dino_weight: float = 1.0
    # dense_objective "vicreg" replaces that term by within-image dense VICReg (:func:`dense_vicreg_loss`):
    # a patch of one global crop is pulled towards the point 1-3 patches away (``dense_radius``) in the
    # other crop (invariance), while every feature must vary across the patches of each image
    # (within-image variance) and across the batch (variance, covariance). The within-image term is
    # what makes it work: without it the cheapest solution is one code per image (an image-level
    # shortcut), and every dense objective tried (DINO, InfoNCE, batch-level VICReg) stayed at the
    # random backbone's linear-probe mIoU (docs/experiments/hp-tiny.md#dense-objectives).
    dense_objective: str = "dino"
    dense_radius: tuple[float, float] = (1.0, 3.0)  # vicreg: neighbour distance, in patches of the other crop
    vicreg_weights: tuple[float, float, float] = (25.0, 25.0, 1.0)  # invariance, variance, covariance
    expander_dim: int = 1024  # vicreg: width of the 2-layer expander on the patch tokens
    # dense_objective "regions" replaces it by region-level contrast (:func:`region_contrast_loss`,
    # after DetCon, Henaff et al., ICCV 2021): every image is split once into region_clusters
    # pseudo-regions by k-means of the frozen random initialisation's patch tokens
    # (:func:`region_masks`); a region's mean-pooled tokens in one global crop must pick out the same
    # region in the other global crop among all regions of the batch, and each local crop (little
    # context) the region under its centre. Negatives include the image's other regions, so one code
    # per image does not solve it. Projector: embed_dim -> hidden_dim -> bottleneck_dim.
    region_clusters: int = 4
    region_temperature: float = 0.1
    # Structure-keeping term (0 disables; :func:`similarity_keep_loss`): the mean squared difference
    # between the cosine similarities of keep_samples random patch tokens of each global crop under
    # the student and under the frozen random initialisation. The random ViT's cosine neighbours
    # are good on the synthetic scenes (they keep colour); jitter-invariant objectives alone trade
    # them away before texture takes over (docs/experiments/hp-tiny.md#keep-term), this term keeps them while the
    # dense term adds texture.
    keep_weight: float = 0.0
    keep_samples: int = 1024
    # Start the backbone from this .safetensors file (an ``export_backbone`` file or any timm-keyed
    # state dict of the same architecture) instead of the seed's random initialisation; the keep term
    # then holds *its* cosine structure, and ``region_masks`` are computed from it. The run records
    # the file's sha256 and refuses to resume from a file with other content.
    init_weights: str | None = None
    momentum_teacher: float = 0.996  # cosine schedule to 1.0
    # Optimisation: AdamW, linear warm-up then cosine; lr is per 256 images (scaled by batch_size / 256).
    batch_size: int = 32
    epochs: int = 50  # 1550 steps of 32 images: ~55 min at ~2.1 s per step on 2 idle CPU cores
    lr: float = 5e-4  # DINO's base lr; 6.25e-5 at batch 32
    min_lr: float = 1e-6
    warmup_epochs: int = 5
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0  # max total gradient norm (0 disables)
    # Run.
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", "auto"
    amp: bool = False  # bfloat16 autocast (CPUs with AMX, recent GPUs); the loss stays float32
    seed: int = 0
    num_workers: int = 0  # DataLoader workers for reading images (folder datasets; synthetic scenes are cached)
    checkpoint_every: int = 100  # steps (and always at the end)

    def __post_init__(self) -> None:
        for name in ("global_crop_scale", "local_crop_scale", "jitter", "blur_sigma", "blur_p", "dense_radius",
                     "vicreg_weights"):
            setattr(self, name, tuple(float(v) for v in getattr(self, name)))
        p = self.patch_size
        for name in ("global_crop_size", "local_crop_size", "img_size"):
            if getattr(self, name) % p:
                raise ValueError(f"{name}={getattr(self, name)} is not a multiple of patch_size={p}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if self.keep_weight < 0 or self.keep_samples < 2:
            raise ValueError(f"keep_weight must be >= 0 and keep_samples >= 2, got {self.keep_weight} and "
                             f"{self.keep_samples}")
        if self.dino_weight < 0 or self.dense_weight < 0:
            raise ValueError(f"dino_weight and dense_weight must be >= 0, got {self.dino_weight} and "
                             f"{self.dense_weight}")
        if self.dino_weight == 0 and self.dense_weight == 0:
            raise ValueError("dino_weight=0 and dense_weight=0 leave nothing to learn: set one of them above 0")
        if self.dense_objective not in ("dino", "vicreg", "regions"):
            raise ValueError(f"dense_objective must be 'dino', 'vicreg' or 'regions', got {self.dense_objective!r}")
        if self.region_clusters < 2 or self.region_temperature <= 0:
            raise ValueError(f"region_clusters must be >= 2 and region_temperature > 0, got {self.region_clusters} "
                             f"and {self.region_temperature}")
        if self.dataset not in ("synthetic", "folder"):
            raise ValueError(f"dataset must be 'synthetic' or 'folder', got {self.dataset!r}")
        if self.dataset == "folder" and not self.root:
            raise ValueError("dataset='folder' needs root=/path/to/images")

    @property
    def matches_random_tiny(self) -> bool:
        """Whether the architecture is ``BACKBONES["random_tiny"]`` (so ``load_backbone`` accepts it)."""
        return (self.patch_size, self.embed_dim, self.depth, self.num_heads, self.img_size) == tuple(
            _TINY.timm_kwargs[k] for k in ("patch_size", "embed_dim", "depth", "num_heads", "img_size"))


@dataclass(frozen=True)
class Terms:
    """The loss terms a configuration trains (:mod:`hpkit.backbones.pretrain.objectives` computes them)."""

    dino: bool  # image-level DINO on the class tokens of all crops (dino_weight > 0)
    dense: str | None  # the dense term's dense_objective ("dino", "vicreg", "regions"); None: dense_weight = 0
    keep: bool  # the structure-keeping term (keep_weight > 0)

    @classmethod
    def of(cls, cfg: PretrainConfig) -> "Terms":
        return cls(dino=cfg.dino_weight > 0, dense=cfg.dense_objective if cfg.dense_weight > 0 else None,
                   keep=cfg.keep_weight > 0)

    @property
    def teacher(self) -> bool:
        """Whether a term trains against the EMA teacher's outputs (the DINO terms)."""
        return self.dino or self.dense == "dino"


def trains_teacher(cfg: PretrainConfig) -> bool:
    """Whether a run's loss uses the EMA teacher (a DINO term); otherwise the teacher is only an
    EMA copy of the student, which lags it, and the student is the better export (measured in
    docs/experiments/hp-tiny.md#pretraining-defaults)."""
    return Terms.of(cfg).teacher


def _config_dict(cfg: PretrainConfig) -> dict:
    """The settings as JSON values (tuples as lists), as ``config.json`` and checkpoints record them."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
