"""Dense CRF refinement (Kraehenbuehl & Koltun) with the constants STEGO and HP use.

Unary: ``-log softmax`` of the class scores bilinearly resized to the image; pairwise: a Gaussian
kernel (sxy 1, compat 3) and a bilateral kernel (sxy 67, srgb 3, compat 4); 10 mean-field steps
(docs/official-code-differences.md#evaluation). Needs ``pydensecrf`` (the ``pydensecrf2`` package, which builds on
Python 3.11; the old ``pydensecrf`` does not).

:func:`crf_batch` refines many images in a process pool that cannot hang: every image has a timeout,
and on any pool failure or timeout the remaining images are refined in this process (hot spot H8,
docs/official-code-differences.md#h8, and STEGO's evaluations that hung for hours in a pool).
"""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import multiprocessing
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from hpkit._util import to_uint8

__all__ = ["crf_available", "dense_crf", "crf_batch", "CRF_PARAMS"]

CRF_PARAMS = dict(gaussian_sxy=1, gaussian_compat=3, bilateral_sxy=67, bilateral_srgb=3, bilateral_compat=4,
                  iterations=10)
MISSING_MESSAGE = ("dense CRF needs the pydensecrf module: `pip install pydensecrf2==1.1` (it is in hpkit's "
            "dependencies; the old `pydensecrf` package does not build on Python >= 3.7)")


def crf_available() -> bool:
    """Whether ``pydensecrf`` can be imported."""
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def _refine(image: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Mean-field inference on numpy arrays: (H, W, 3) uint8, (C, H, W) float32 probabilities -> Q."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    c, h, w = probs.shape
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=CRF_PARAMS["gaussian_sxy"], compat=CRF_PARAMS["gaussian_compat"])
    crf.addPairwiseBilateral(sxy=CRF_PARAMS["bilateral_sxy"], srgb=CRF_PARAMS["bilateral_srgb"], rgbim=image,
                             compat=CRF_PARAMS["bilateral_compat"])
    return np.array(crf.inference(CRF_PARAMS["iterations"]), dtype=np.float32).reshape(c, h, w)


def _prepare(image: Tensor | np.ndarray, scores: Tensor) -> tuple[np.ndarray, np.ndarray]:
    rgb = to_uint8(image)
    h, w = rgb.shape[:2]
    if scores.dim() != 3:
        raise ValueError(f"scores must be (C, h, w) log-probabilities or logits, got {tuple(scores.shape)}")
    scores = F.interpolate(scores.detach().float().cpu()[None], size=(h, w), mode="bilinear",
                           align_corners=False)[0]
    return rgb, scores.softmax(dim=0).numpy().astype(np.float32)


def dense_crf(image: Tensor | np.ndarray, scores: Tensor) -> Tensor:
    """Refine one image's class scores.

    Args:
        image: (3, H, W) float in [0, 1], or (H, W, 3) uint8.
        scores: (C, h, w) logits or log-probabilities (resized to H x W bilinearly, then softmaxed).

    Returns:
        (C, H, W) float32 marginals Q; ``argmax(0)`` is the refined label map.

    Raises:
        ImportError: ``pydensecrf`` is missing (the message says what to install).
    """
    if not crf_available():
        raise ImportError(MISSING_MESSAGE)
    rgb, probs = _prepare(image, scores)
    return torch.from_numpy(_refine(rgb, probs))


def crf_batch(images: Tensor, scores: Tensor, *, workers: int | None = None, timeout: float = 120.0) -> Tensor:
    """Refine a batch, in parallel where it pays off, falling back to serial instead of hanging.

    Args:
        images: (B, 3, H, W) in [0, 1].
        scores: (B, C, h, w) logits or log-probabilities.
        workers: processes (``None``: the CPU count for 8 or more images, else serial; 0 or 1:
            serial in this process). The pool is started once (seconds: each worker imports
            torch) and kept for later calls with the same number of workers.
        timeout: seconds allowed per image before the pool is abandoned.

    Returns:
        (B, H, W) long refined label maps.
    """
    if not crf_available():
        raise ImportError(MISSING_MESSAGE)
    jobs = [_prepare(img, sc) for img, sc in zip(images, scores)]
    results: list[np.ndarray | None] = [None] * len(jobs)
    if workers is None:
        workers = min(os.cpu_count() or 1, len(jobs)) if len(jobs) >= 8 else 1
    if workers > 1:
        pool = _pool(workers)
        try:
            futures = [pool.submit(_refine, rgb, probs) for rgb, probs in jobs]
            for i, future in enumerate(futures):
                results[i] = future.result(timeout=timeout)
        except (cf.TimeoutError, cf.process.BrokenProcessPool, OSError, RuntimeError) as err:
            warnings.warn(f"CRF process pool failed ({type(err).__name__}); refining the remaining images "
                          "serially", stacklevel=2)
            _POOLS.pop(workers, None)
            _abandon(pool)
    for i, (rgb, probs) in enumerate(jobs):
        if results[i] is None:
            results[i] = _refine(rgb, probs)
    return torch.from_numpy(np.stack([r.argmax(0) for r in results])).long()


_POOLS: dict[int, cf.ProcessPoolExecutor] = {}


def _pool(workers: int) -> cf.ProcessPoolExecutor:
    """The shared pool of ``workers`` spawned processes (started on first use, closed at exit)."""
    if workers not in _POOLS:
        _POOLS[workers] = cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
        if len(_POOLS) == 1:
            atexit.register(_close_pools)
    return _POOLS[workers]


def _close_pools() -> None:
    for pool in list(_POOLS.values()):
        _abandon(pool)
    _POOLS.clear()


def _abandon(pool: cf.ProcessPoolExecutor) -> None:
    """Stop a pool without waiting for stuck workers (terminates them)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
