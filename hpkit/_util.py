"""Small helpers every layer shares: seeded generators, the device, autocast, atomic writes, Ctrl-C,
images as uint8 and memory in use / at peak. No hpkit imports: this module sits below all the layers."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

__all__ = ["generator", "sequence_generator", "resolve_device", "autocast", "atomic_write", "deferred_sigint",
           "to_uint8", "memory_in_use_mb", "reset_peak_memory", "peak_memory_mb"]


def generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from integer keys, e.g. ``generator(seed, epoch)`` (the same on every machine)."""
    return torch.Generator().manual_seed(hash(keys) % (2**62))


def sequence_generator(*keys: int) -> torch.Generator:
    """Like :func:`generator`, seeded through ``numpy.random.SeedSequence`` (well mixed; keys >= 0).

    Backbone pretraining uses this one, so the bundled backbone's recipe reproduces bit for bit."""
    seed = int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> np.uint64(1))
    return torch.Generator().manual_seed(seed)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cuda"`` -> the process's GPU ``local_rank``.

    Raises:
        ValueError: a CUDA device is asked for where there is none.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for but no CUDA device is available; use cpu")
        return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)
    return torch.device(name)


def autocast(amp: str, device: torch.device, key: str = "amp") -> tuple[contextlib.AbstractContextManager, bool]:
    """The autocast context for ``amp`` in ``auto | off | bf16 | fp16``, and whether fp16 needs a
    gradient scaler. ``auto`` is bf16 on CUDA and off on the CPU; ``key`` names the setting in errors."""
    if amp not in ("auto", "off", "bf16", "fp16"):
        raise ValueError(f"{key} must be auto, off, bf16 or fp16, got {amp!r}")
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "off"
    if amp == "off":
        return contextlib.nullcontext(), False
    if amp == "fp16" and device.type != "cuda":
        raise ValueError(f"{key}=fp16 needs CUDA; use {key}=bf16 or off on CPU")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype), amp == "fp16"


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through ``write(tmp)`` on a temporary file in the same folder, then ``os.replace``
    it into place: a crash mid-write never leaves half a file or replaces the old one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def deferred_sigint(who: str = "hpkit") -> Iterator[dict]:
    """While active, a first Ctrl-C only sets ``flag["stop"]`` (the step in flight finishes); a second
    Ctrl-C raises ``KeyboardInterrupt`` at once. Outside the main thread nothing is changed."""
    flag = {"stop": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):  # noqa: ANN001 - signal handler signature
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True
        print(f"\n{who}: stopping after this step and saving a checkpoint (Ctrl-C again to stop now)",
              file=sys.stderr, flush=True)

    signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def to_uint8(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """An image as contiguous (H, W, 3) uint8: from a (3, H, W) tensor or (H, W, 3) array in [0, 1], or
    already uint8 (returned as is). (B, 3, H, W) tensors give (B, H, W, 3)."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.dim() not in (3, 4) or image.shape[-3] != 3:
            raise ValueError(f"image must be (3, H, W) or (B, 3, H, W) in [0, 1], got {tuple(image.shape)}")
        image = image.movedim(-3, -1).float().numpy()
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    return np.ascontiguousarray(image)


def memory_in_use_mb(device: torch.device | str = "cpu") -> float:
    """Memory in use now, in MiB: ``torch.cuda.memory_allocated`` on CUDA, the resident set on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # no /proc: the best available is the peak
        return peak_memory_mb(device)


def reset_peak_memory(device: torch.device | str = "cpu") -> None:
    """Start a new peak: ``torch.cuda.reset_peak_memory_stats`` on CUDA; on Linux the kernel's peak-RSS
    mark (VmHWM, reset through ``/proc/self/clear_refs``); elsewhere nothing (the lifetime peak stays)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device | str = "cpu") -> float:
    """Peak memory since the last :func:`reset_peak_memory`, in MiB: ``torch.cuda.max_memory_allocated``
    on CUDA, the peak resident set (VmHWM; ``ru_maxrss`` without /proc) on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20
