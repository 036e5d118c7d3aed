"""Dense CRF: it snaps noisy scores to colour edges, the pool equals serial, and it never hangs."""

import builtins

import pytest
import torch

import hpkit.pipeline.crf as crf


def two_region_case(seed=0):
    """A 32x32 image, left half dark red, right half light blue; scores favour the truth weakly + noise."""
    g = torch.Generator().manual_seed(seed)
    image = torch.zeros(3, 32, 32)
    image[:, :, :16] = torch.tensor([0.6, 0.1, 0.1])[:, None, None]
    image[:, :, 16:] = torch.tensor([0.3, 0.6, 0.9])[:, None, None]
    truth = torch.zeros(32, 32, dtype=torch.long)
    truth[:, 16:] = 1
    scores = torch.nn.functional.one_hot(truth, 2).permute(2, 0, 1).float() * 0.6
    scores = scores + 0.8 * torch.randn(2, 32, 32, generator=g)
    return image, scores, truth


def test_crf_fixes_noisy_pixels_along_colour_edges():
    image, scores, truth = two_region_case()
    before = (scores.argmax(0) == truth).float().mean().item()
    q = crf.dense_crf(image, scores)
    after = (q.argmax(0) == truth).float().mean().item()
    assert q.shape == (2, 32, 32) and torch.allclose(q.sum(0), torch.ones(32, 32), atol=1e-4)
    assert before < 0.8 and after > 0.98, (before, after)


def test_scores_are_resized_to_the_image():
    image, scores, truth = two_region_case(1)
    small = torch.nn.functional.avg_pool2d(scores[None], 4)[0]  # (2, 8, 8) patch-level scores
    assert crf.dense_crf(image, small).shape == (2, 32, 32)


def test_pool_equals_serial_and_timeouts_fall_back(monkeypatch):
    cases = [two_region_case(s) for s in range(3)]
    images = torch.stack([c[0] for c in cases])
    scores = torch.stack([c[1] for c in cases])
    serial = crf.crf_batch(images, scores, workers=1)
    assert serial.shape == (3, 32, 32)
    assert torch.equal(crf.crf_batch(images, scores, workers=2), serial)
    pool = crf._POOLS[2]
    assert torch.equal(crf.crf_batch(images, scores, workers=2), serial) and crf._POOLS[2] is pool  # reused
    with pytest.warns(UserWarning, match="refining the remaining images serially"):
        fallback = crf.crf_batch(images, scores, workers=2, timeout=1e-4)  # every wait times out
    assert torch.equal(fallback, serial) and 2 not in crf._POOLS  # a failed pool is dropped, not reused


def test_missing_package_is_a_clear_error(monkeypatch):
    real_import = builtins.__import__

    def no_crf(name, *args, **kwargs):
        if name.startswith("pydensecrf"):
            raise ImportError("No module named 'pydensecrf'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_crf)
    assert not crf.crf_available()
    image, scores, _ = two_region_case()
    with pytest.raises(ImportError, match="pip install pydensecrf2==1.1"):
        crf.dense_crf(image, scores)
