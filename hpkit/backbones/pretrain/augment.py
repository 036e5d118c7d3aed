"""DINO's multi-crop augmentation (:class:`MultiCrop`), drawn from an explicit generator: random
resized crops with their boxes, flips, colour jitter (hue as a YIQ rotation), grayscale, blur and
solarization."""

from __future__ import annotations

import math

import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from hpkit.backbones.pretrain.config import PretrainConfig

__all__ = ["MultiCrop"]


_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                           dtype=torch.float64)
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


def _shift_hue(img: Tensor, shift: float) -> Tensor:
    """Hue rotation of (3, H, W) in [0, 1] by ``shift`` turns (rotation of the IQ chroma plane)."""
    a = 2 * math.pi * shift
    rot = torch.tensor([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]],
                       dtype=torch.float64)
    m = (_YIQ_TO_RGB @ rot @ _RGB_TO_YIQ).to(img.dtype)
    return (m @ img.reshape(3, -1)).reshape(img.shape).clamp_(0, 1)


def _uniform(g: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))


def _crop_box(height: int, width: int, scale: tuple[float, float], g: torch.Generator,
              ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box ``(top, left, h, w)``: area fraction in ``scale``, log-uniform aspect ratio."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(g, *scale)
        aspect = math.exp(_uniform(g, *log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=g))
            left = int(torch.randint(0, width - w + 1, (), generator=g))
            return top, left, h, w
    side = min(height, width)  # fallback: the central square
    return (height - side) // 2, (width - side) // 2, side, side


class MultiCrop:
    """DINO's multi-crop augmentation of a batch (B, 3, H, W) in [0, 1].

    ``crops = MultiCrop(cfg)(images, generator)`` is a list of ``2 + num_local_crops`` tensors: two
    global crops (B, 3, G, G) then the local crops (B, 3, L, L), all in [0, 1]. Each crop: random
    resized crop (antialiased), horizontal flip, colour jitter in random order (p ``jitter_p``),
    grayscale (p ``grayscale_p``), Gaussian blur (p ``blur_p`` per crop kind) and, for the second
    global crop, solarization (p ``solarize_p``). All randomness comes from ``generator``.
    """

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg
        self.blur_kernel = 2 * math.ceil(3 * cfg.blur_sigma[1]) + 1

    def _jitter(self, x: Tensor, g: torch.Generator) -> Tensor:
        b, c, s, h = self.cfg.jitter
        for op in torch.randperm(4, generator=g).tolist():
            if op == 0 and b > 0:
                x = TF.adjust_brightness(x, _uniform(g, max(0.0, 1 - b), 1 + b))
            elif op == 1 and c > 0:
                x = TF.adjust_contrast(x, _uniform(g, max(0.0, 1 - c), 1 + c))
            elif op == 2 and s > 0:
                x = TF.adjust_saturation(x, _uniform(g, max(0.0, 1 - s), 1 + s))
            elif op == 3 and h > 0:
                x = _shift_hue(x, _uniform(g, -h, h))
        return x

    def view(self, image: Tensor, size: int, scale: tuple[float, float], blur_p: float, solarize_p: float,
             g: torch.Generator) -> tuple[Tensor, Tensor]:
        """One augmented crop (3, size, size) of ``image`` (3, H, W) in [0, 1], and its box (5,):
        top, left, height, width as fractions of the image side, and 1.0 if flipped (else 0.0)."""
        cfg = self.cfg
        height, width = image.shape[-2:]
        top, left, h, w = _crop_box(height, width, scale, g)
        x = TF.resized_crop(image, top, left, h, w, [size, size], antialias=True).clamp_(0, 1)
        flip = _uniform(g) < 0.5
        if flip:
            x = TF.horizontal_flip(x)
        if _uniform(g) < cfg.jitter_p:
            x = self._jitter(x, g)
        if _uniform(g) < cfg.grayscale_p:
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        if _uniform(g) < blur_p:
            sigma = _uniform(g, *cfg.blur_sigma)
            x = TF.gaussian_blur(x, [self.blur_kernel, self.blur_kernel], [sigma, sigma])
        if _uniform(g) < solarize_p:
            x = TF.solarize(x, 0.5)
        return x, torch.tensor([top / height, left / width, h / height, w / width, float(flip)])

    def __call__(self, images: Tensor, generator: torch.Generator, *, boxes: bool = False
                 ) -> list[Tensor] | tuple[list[Tensor], Tensor]:
        """images (B, 3, H, W) in [0, 1] -> [global 1, global 2, local 1, ...], each (B, 3, S, S).

        With ``boxes=True`` also the crop boxes (n_crops, B, 5) (see :meth:`view`); the crops are
        the same either way."""
        cfg = self.cfg
        kinds = [(cfg.global_crop_size, cfg.global_crop_scale, cfg.blur_p[0], 0.0),
                 (cfg.global_crop_size, cfg.global_crop_scale, cfg.blur_p[1], cfg.solarize_p)]
        kinds += [(cfg.local_crop_size, cfg.local_crop_scale, cfg.blur_p[2], 0.0)] * cfg.num_local_crops
        images = images.float().cpu()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # hundreds of tiny ops: thread start-up costs more than it saves (10x on 2 cores)
        try:
            views = [[self.view(img, size, scale, blur, sol, generator) for img in images]
                     for size, scale, blur, sol in kinds]
        finally:
            torch.set_num_threads(threads)
        crops = [torch.stack([x for x, _ in kind]) for kind in views]
        if not boxes:
            return crops
        return crops, torch.stack([torch.stack([box for _, box in kind]) for kind in views])
