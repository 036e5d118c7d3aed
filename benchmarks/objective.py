"""Forward + backward time and peak memory of the HP objective and of LHP mixing.

Usage::

    python benchmarks/objective.py                 # the three sizes of the core issue, CPU
    python benchmarks/objective.py --sizes 8,28,512 --repeats 3 --device cuda

For each (B, grid, D) it measures, each case in a fresh subprocess (so peak memory is its own):

- ``hpkit paper`` / ``hpkit official``: :func:`hpkit.hp_objective` (chunked, both GHP sets, Phi and Psi),
  in float32 and with ``matmul_dtype=torch.bfloat16`` (``bf16``; selection stays float32);
- ``naive dense``: Eq. 11 with full (N, N) tensors and autograd (``hp_objective(..., reference=True)``,
  the readable :mod:`hpkit.method.reference`);
- ``official-like slab``: the official code's per-image slab loop with repeated criteria, float
  masks and exp/log of masked products under autograd (``official_objective``), in float32 and
  under bf16 autocast (``bf16``; the official code itself runs under fp16 autocast);
- ``LHP hpkit``: :func:`hpkit.local_mix` (9 shifted views) vs ``LHP dense``: the official per-image
  dense (P, P, D) product (``official_lhp_dense``).

The other baselines are the official-code formulations of ``tests/dense_reference.py``; the tests check
that every baseline computes the same values as hpkit, so the timings compare equal work. Inputs:
clustered unit features (27 clusters, so every anchor has hidden positives), C = 384 (ViT-S),
M = 2048, tau = 0.8, rho = 0.02, lambda = 0.5. Peak memory is the growth of the process's peak resident set (CPU, VmHWM reset after
set-up) or
``torch.cuda.max_memory_allocated`` (CUDA) over the calls, from just before the first; time is the
fastest of ``--repeats`` calls after a warm-up call.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

CASES = ["hpkit paper", "hpkit official", "hpkit paper bf16", "hpkit official bf16", "naive dense",
         "official-like slab", "official-like slab bf16", "LHP hpkit", "LHP dense"]
C, M, TAU, RHO, LAM, CLUSTERS = 384, 2048, 0.8, 0.02, 0.5, 27


def _estimate_gb(case: str, b: int, grid: int, d: int) -> float:
    """Rough peak memory of a baseline, to skip cases this machine cannot hold."""
    p = grid * grid
    n = b * p
    if case == "naive dense":  # hpkit.method.reference peaks at ~24 (N, N) float32 buffers (measured, N = 2048)
        return 24 * n * n * 4 / 1e9
    if case.startswith("official-like slab"):
        return (6 * p * n * 4 * b + 25 * p * n * 4) / 1e9
    if case == "LHP dense":
        return 2 * p * p * d * 4 / 1e9
    return 0.0


def _gb(mib: float) -> float:
    return mib * 2**20 / 1e9


def _run_case(case: str, b: int, grid: int, d: int, repeats: int, device: str) -> dict:
    import torch
    import torch.nn.functional as F

    import hpkit
    from hpkit._util import memory_in_use_mb, peak_memory_mb, reset_peak_memory
    from dense_reference import official_lhp_dense, official_objective

    torch.manual_seed(0)
    p = grid * grid
    n = b * p
    dev = torch.device(device)

    def clustered(rows: int, width: int) -> torch.Tensor:
        centres = torch.randn(CLUSTERS, width)
        labels = torch.randint(0, CLUSTERS, (rows,))
        return F.normalize(centres[labels] + 0.8 * torch.randn(rows, width), dim=1).to(dev)

    f, s_ema, z0, m0 = clustered(n, C), clustered(n, d), clustered(n, d), clustered(n, d)
    pool_ag, pool_sp = clustered(M, C), clustered(M, d)
    s0 = torch.randn(b, d, grid, grid, device=dev)
    logits = torch.randn(b, 6, p, p, device=dev).mul_(3) if case.startswith("LHP") else None
    neg_shared = torch.rand(p, n, device=dev) < RHO

    def run_once():
        z, m = z0.clone().requires_grad_(), m0.clone().requires_grad_()
        if case.startswith("LHP"):
            s = s0.clone().requires_grad_()
            out = hpkit.local_mix(s, logits, style="official") if case == "LHP hpkit" else \
                official_lhp_dense(s, logits)
            out.square().sum().backward()
            return
        bf16 = torch.bfloat16 if case.endswith("bf16") else None
        if case.startswith("hpkit"):
            style = "official" if "official" in case else "paper"
            loss = hpkit.hp_objective(z, f, s_ema, pool_ag, pool_sp, patches_per_image=p, lam=LAM, tau=TAU,
                                      rho=RHO, z_mix=m, style=style, negatives=neg_shared if style == "official"
                                      else None, matmul_dtype=bf16)
        elif case == "naive dense":
            rand = torch.rand(n, n, device=dev) < RHO
            loss = hpkit.hp_objective(z, f, s_ema, pool_ag, pool_sp, patches_per_image=p, lam=LAM, tau=TAU, rho=RHO,
                                      z_mix=m, negatives=rand, reference=True)
        else:  # the official code runs under fp16 autocast; bf16 autocast is the CPU analogue
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16 is not None):
                loss = official_objective(z, f, s_ema, pool_ag, pool_sp, neg_shared, patches_per_image=p,
                                          lam=LAM, tau=TAU, z_mix=m)
        loss.backward()

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    # Peak memory over all calls (the first one included, before any allocator caching), relative
    # to the memory held just before it; time is the fastest of `repeats` calls after a warm-up.
    reset_peak_memory(dev)  # CUDA: max_memory_allocated; CPU: the kernel's peak RSS mark (VmHWM)
    base = memory_in_use_mb(dev)
    run_once()  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_once()
        sync()
        times.append(time.perf_counter() - start)
    return {"time_s": min(times), "peak_gb": max(_gb(peak_memory_mb(dev) - base), 0.0)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="*", default=["8,28,512", "16,28,512", "16,40,512"],
                        help="B,grid,D triples")
    parser.add_argument("--cases", nargs="*", default=CASES, choices=CASES)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-gb", type=float, default=16.0, help="skip baselines estimated above this")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args(argv)

    if args.one:
        case, b, grid, d = args.one.split("|")
        print(json.dumps(_run_case(case, int(b), int(grid), int(d), args.repeats, args.device)))
        return 0

    rows = []
    for size in args.sizes:
        b, grid, d = (int(v) for v in size.split(","))
        for case in args.cases:
            est = _estimate_gb(case, b, grid, d)
            if est > args.max_gb:
                rows.append(dict(size=size, case=case, time_s=None, peak_gb=None, note=f"skipped (~{est:.0f} GB)"))
                continue
            cmd = [sys.executable, __file__, "--one", f"{case}|{b}|{grid}|{d}", "--repeats", str(args.repeats),
                   "--device", args.device]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                rows.append(dict(size=size, case=case, time_s=None, peak_gb=None,
                                 note=f"failed: {proc.stderr.strip().splitlines()[-1][:60]}"))
            else:
                rows.append(dict(size=size, case=case, **json.loads(proc.stdout.strip().splitlines()[-1]), note=""))
            r = rows[-1]
            print(f"  {size:>10} {case:<20} {r['time_s'] if r['time_s'] is None else round(r['time_s'], 3)}s "
                  f"{r['peak_gb'] if r['peak_gb'] is None else round(r['peak_gb'], 3)} GB {r['note']}",
                  file=sys.stderr, flush=True)

    print("\n| (B, grid, D) | N | case | fwd+bwd time (s) | peak memory (GB) | vs official-like slab (same precision) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        b, grid, d = (int(v) for v in r["size"].split(","))
        same = "official-like slab bf16" if r["case"].endswith("bf16") else "official-like slab"
        slab = next((x for x in rows if x["size"] == r["size"] and x["case"] == same), None)
        ratio = ""
        if r["time_s"] is not None and slab and slab["time_s"] and not r["case"].startswith(("LHP", "official")):
            ratio = f"{r['time_s'] / slab['time_s']:.2f}x time, {r['peak_gb'] / slab['peak_gb']:.2f}x memory"
        if r["case"] == "LHP hpkit":
            dense = next((x for x in rows if x["size"] == r["size"] and x["case"] == "LHP dense"), None)
            if dense and dense["time_s"]:
                ratio = (f"vs LHP dense: {r['time_s'] / dense['time_s']:.3f}x time, "
                         f"{r['peak_gb'] / dense['peak_gb']:.2f}x memory")
        t = "-" if r["time_s"] is None else f"{r['time_s']:.3f}"
        mem = "-" if r["peak_gb"] is None else f"{r['peak_gb']:.3f}"
        print(f"| ({b}, {grid}, {d}) | {b * grid * grid} | {r['case']} | {t} | {mem} | {ratio or r['note']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
