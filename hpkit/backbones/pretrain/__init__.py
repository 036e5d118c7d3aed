"""Pretrain hpkit's tiny ViT with DINO self-distillation (Caron et al., ICCV 2021), offline, on CPU.

DINO in a few lines: a *student* and a *teacher* network (the same ViT + projection head) see
different random crops of one image: the teacher only the 2 large "global" crops, the student
those and several small "local" crops. The student learns, by cross-entropy, to predict the
teacher's output distribution over K prototypes for every other crop ("local-to-global"
correspondence). The teacher is not trained by gradients: it is an exponential moving average
(EMA) of the student. Collapse is avoided by *centering* the teacher's logits (subtracting a
running mean, which prevents one prototype from dominating) and *sharpening* them (a low teacher
temperature, which prevents the uniform distribution). The teacher's backbone is the result.

``pretrain(cfg, out_dir)`` runs one readable loop (nanoGPT style) and writes ``checkpoint.pt``,
``config.json`` and ``history.json``; ``export_backbone(out_dir, path)`` writes the teacher ViT as
``.safetensors`` (timm keys, no DINO head) plus ``path.json`` metadata, loadable with
``hpkit.load_backbone("random_tiny", weights=path)``. Command line (settings as ``--set FIELD=VALUE``,
or ``--field-name VALUE``)::

    python -m hpkit pretrain runs/dino --set epochs=20 --export weights/dino_tiny.safetensors   # --resume: continue

The modules, one concept each: :mod:`.config` (:class:`PretrainConfig`), :mod:`.augment`
(:class:`MultiCrop`), :mod:`.model` (ViT, heads), :mod:`.geometry` (where a crop's patches lie in
another crop), :mod:`.regions` (pseudo-regions), :mod:`.losses` (one function per objective),
:mod:`.schedules`, :mod:`.state` (what a run holds; checkpoints), :mod:`.objectives` (a step's forward
pass and loss, term by term), :mod:`.loop` (:func:`pretrain`), :mod:`.export` (backbone files),
:mod:`.images`, :mod:`.flags` (the ``--set`` dialect, shared with ``hpkit align-attention``) and
:mod:`.cli`.

Where hpkit differs from the official DINO code (all configurable, see :class:`PretrainConfig`):

- the ViT is timm's, built exactly like ``BACKBONES["random_tiny"]`` (``img_size=224``,
  ``dynamic_img_size=True``): its position embedding keeps the 28 x 28 grid and is interpolated for
  the 96 and 48 px crops, so the weights load into the same model at any image size;
- augmentations are DINO's, written with ``torchvision.transforms.v2.functional`` on images in
  [0, 1] and drawn from an explicit generator; the hue jitter is a rotation in YIQ space
  (torchvision's HSV hue costs ~12 ms per crop on CPU, more than everything else together);
- photometric augmentation is milder, for textures: the synthetic classes are texture families
  (speckle, streaks, stripes 1-3 px wide) whose colours overlap, and half of the regions borrow
  another class's colours, so colour is a weak cue and texture the strong one. Blur, which erases
  1-3 px textures, has its sigma scaled to the crop size (DINO's 0.1-2.0 at 224 px -> 0.1-0.8 at
  96 px) and probability 0.2 / 0.1 / 0.2 (global 1 / global 2 / local; DINO 1.0 / 0.1 / 0.5).
  Colour jitter (0.2, 0.2, 0.1, 0.02) with p 0.5 and grayscale p 0.05 (DINO: (0.4, 0.4, 0.2, 0.1),
  p 0.8, 0.2), because DINO's strength kept the teacher near uniform in short runs
  (docs/experiments/hp-tiny.md#pretraining-defaults); solarization (p 0.2 on the second global crop) keeps edges and stays;
- gradients are clipped by their total norm (``clip_grad_norm_``), not per parameter;
- optional dense term (``dense_weight > 0``; off by default, so the default is plain DINO): every
  student patch token predicts, through a second DINO head with its own center, the teacher's patch
  token at the same image point in each other global crop (:func:`correspondence` maps patch centres
  between crops from their boxes; :func:`dense_dino_loss`);
- ``dense_objective="vicreg"`` swaps that term for within-image dense VICReg
  (:func:`dense_vicreg_loss`): patches 1-3 patches apart in the two global crops are pulled together
  while each feature must also vary across the patches of every image. Without the within-image
  term, every dense objective tried here (patch DINO, InfoNCE, batch-level VICReg) found the same
  shortcut: one code per image, which matches neighbours perfectly and separates images, but says
  nothing about regions (docs/experiments/hp-tiny.md#dense-objectives);
- ``dense_objective="regions"`` swaps it for region-level contrast (:func:`region_contrast_loss`,
  after DetCon): pseudo-regions from k-means of each image's tokens under the frozen random
  initialisation (:func:`region_masks`), matched between the two global crops and from each local
  crop (which sees little context) to the region under its centre, with the batch's other regions,
  those of the same image included, as negatives (docs/experiments/hp-tiny.md#region-contrast);
- ``keep_weight > 0`` adds a term that holds the patch tokens' cosine similarities close to those of
  the frozen initialisation (:func:`similarity_keep_loss`); when no DINO term trains against the
  teacher, ``export_backbone`` writes the student;
- ``init_weights=FILE`` starts from an exported backbone instead of the seed's random
  initialisation (the keep term and the pseudo-regions then refer to it), so that recipes can be
  chained; the file's digest and metadata travel with the export (data/README.md gives the chain
  behind the bundled ``hp-tiny``);
- the teacher temperature is 0.04 throughout (DINO's default for ViT-S/16, 100 epochs); DINO's
  0.04 -> 0.07 warm-up over 30 epochs (``warmup_teacher_temp_epochs``) is meant for long runs and
  drove the teacher towards the uniform distribution in a short trial (docs/experiments/hp-tiny.md#pretraining-defaults).

Determinism, checkpoints, Ctrl-C and what to monitor: :mod:`.loop`.
"""

from hpkit.backbones.pretrain.augment import MultiCrop
from hpkit.backbones.pretrain.cli import main
from hpkit.backbones.pretrain.config import _RUN_ONLY, CHECKPOINT, PretrainConfig, Terms, _config_dict, trains_teacher  # noqa: F401 (the tests and recipes read them)
from hpkit.backbones.pretrain.export import (
    export_backbone,
    load_init_weights,
    read_backbone_metadata,
    save_backbone_file,
)
from hpkit.backbones.pretrain.flags import add_config_flags, config_from_flags, parse_setting, parse_settings
from hpkit.backbones.pretrain.geometry import correspondence, neighbour_points
from hpkit.backbones.pretrain.images import pretraining_images
from hpkit.backbones.pretrain.loop import PretrainingDiverged, pretrain
from hpkit.backbones.pretrain.losses import (
    dense_dino_loss,
    dense_vicreg_loss,
    dino_loss,
    region_contrast_loss,
    similarity_keep_loss,
    vicreg_terms,
)
from hpkit.backbones.pretrain.model import DINOHead, DINONet, build_vit, expander
from hpkit.backbones.pretrain.regions import region_ids, region_masks
from hpkit.backbones.pretrain.schedules import cosine_schedule, ema_update, teacher_temperature, update_center

__all__ = ["PretrainConfig", "DINOHead", "DINONet", "MultiCrop", "PretrainingDiverged", "build_vit", "dino_loss",
           "correspondence", "dense_dino_loss", "neighbour_points", "vicreg_terms", "dense_vicreg_loss", "expander",
           "similarity_keep_loss", "load_init_weights", "region_masks", "region_ids", "region_contrast_loss",
           "update_center", "ema_update", "cosine_schedule", "teacher_temperature", "pretrain", "trains_teacher",
           "export_backbone", "save_backbone_file", "read_backbone_metadata", "pretraining_images",
           "CHECKPOINT", "Terms", "add_config_flags", "config_from_flags", "parse_setting", "parse_settings", "main"]
