"""One HP training step, end to end, with a printed account of what each stage produced.

``python -m hpkit quickstart`` runs it: backbone -> heads -> pools -> global and local hidden
positives -> both styles of the objective -> backward. It uses ``load_backbone("auto")`` (DINO
ViT-S/8 when its weights are on this machine, otherwise hpkit's bundled tiny ViT ``hp-tiny``) on random
images, so it shows the data flow and the costs, not segmentation quality.
"""

from __future__ import annotations

import time

import torch

from hpkit.backbones.vit import load_backbone
from hpkit.method.global_positives import global_hidden_positives
from hpkit.method.heads import MomentumHead, ProjectionHead, SegmentationHead, to_rows
from hpkit.method.local_positives import local_weights, mix_neighbours
from hpkit.method.objective import hp_objective
from hpkit.method.pools import ReferencePools, sample_patches


def run_quickstart(*, batch: int = 4, image_size: int = 64, dim: int = 64, pool_size: int = 32,
                   tau: float = 0.6, rho: float = 0.02, lam: float = 0.5, seed: int = 0,
                   backbone: str = "auto", print_fn=print) -> dict[str, float]:
    """Run one HP step on random images and report sizes, positive counts and losses.

    Returns:
        dict with the paper- and official-style losses, mean positives per anchor and timings.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    vit = load_backbone(backbone)
    images = torch.rand(batch, 3, image_size, image_size, generator=gen)
    bank_images = torch.rand(pool_size, 3, image_size, image_size, generator=gen)
    t0 = time.perf_counter()
    feats, attn = vit(images)
    bank = sample_patches(vit(bank_images, attention=False).feats, generator=gen)
    t_backbone = time.perf_counter() - t0
    b, c, h, w = feats.shape
    print_fn(f"backbone {vit.name}: images {tuple(images.shape)} -> feats {tuple(feats.shape)}, "
             f"attention logits {tuple(attn.shape)} ({t_backbone:.2f}s)")

    head, proj = SegmentationHead(c, dim), ProjectionHead(dim)
    ema = MomentumHead(head, momentum=0.99)
    pools = ReferencePools(bank, pool_size, generator=gen)
    pools.refresh_specific(ema, generator=gen)
    print_fn(f"pools: Q^ag {tuple(pools.agnostic.shape)} (fixed), Q^sp {tuple(pools.specific.shape)} "
             "(refreshed from the cached bank, no backbone pass)")

    f = torch.nn.functional.normalize(to_rows(feats), dim=1)
    s = head(feats)
    s_ema = torch.nn.functional.normalize(to_rows(ema(feats)), dim=1)
    agnostic = global_hidden_positives(f, pools.agnostic)
    specific = global_hidden_positives(s_ema, pools.specific)
    print_fn(f"GHP: {agnostic.sum(1).float().mean():.1f} task-agnostic and {specific.sum(1).float().mean():.1f} "
             f"task-specific positives per anchor among N={b * h * w} patches")

    weights = local_weights(attn, (h, w))
    kept = (weights > 0).sum(1).float().mean()
    print_fn(f"LHP: {kept:.2f} of the 3x3 neighbours (incl. the anchor) kept per anchor on average")

    z = proj(to_rows(s))
    z_mix = proj(to_rows(mix_neighbours(s, weights)))
    out: dict[str, float] = {"agnostic_per_anchor": float(agnostic.sum(1).float().mean()),
                             "specific_per_anchor": float(specific.sum(1).float().mean()),
                             "lhp_per_anchor": float(kept)}
    for style in ("paper", "official"):
        t0 = time.perf_counter()
        loss = hp_objective(z, f, s_ema, pools.agnostic, pools.specific, patches_per_image=h * w, lam=lam,
                            tau=tau, rho=rho, z_mix=z_mix, style=style, generator=gen)
        loss.backward(retain_graph=True)
        out[f"loss_{style}"] = loss.item()
        out[f"seconds_{style}"] = time.perf_counter() - t0
        print_fn(f"objective ({style} style): {loss.item():.4f}, forward+backward {out[f'seconds_{style}']:.3f}s")
    grad_norm = sum(float(p.grad.norm()) ** 2 for p in head.parameters()) ** 0.5
    print_fn(f"gradient reached the segmentation head (both styles summed): |grad| = {grad_norm:.3e}")
    out["head_grad_norm"] = grad_norm
    return out
