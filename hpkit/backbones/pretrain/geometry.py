"""Where points of one crop lie in another: crops are boxes of the image (:class:`MultiCrop` with
``boxes=True``), so patch centres map between crops without looking at pixels."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["correspondence", "neighbour_points"]


def correspondence(student_box: Tensor, teacher_box: Tensor, grid: int) -> tuple[Tensor, Tensor]:
    """Where the centres of a student crop's ``grid x grid`` patches lie in a teacher crop.

    Args:
        student_box, teacher_box: (B, 5) crop boxes from :class:`MultiCrop` (top, left, height,
            width as fractions of the image side, flipped).
        grid: the student crop's patch grid side.

    Returns:
        points (B, grid, grid, 2): (x, y) in the teacher crop in ``grid_sample`` coordinates
        ([-1, 1] spans the crop, ``align_corners=False``); inside (B, grid, grid) bool: the point
        lies in the teacher crop.
    """
    u = (torch.arange(grid, dtype=student_box.dtype, device=student_box.device) + 0.5) / grid  # (grid,)
    sb, tb = student_box[:, :, None], teacher_box[:, :, None]  # (B, 5, 1)
    col = torch.where(sb[:, 4] > 0.5, 1 - u, u)  # (B, grid) position across the unflipped student crop
    img_y = sb[:, 0] + u * sb[:, 2]  # (B, grid) image coordinates (fractions)
    img_x = sb[:, 1] + col * sb[:, 3]
    ty = (img_y - tb[:, 0]) / tb[:, 2]  # (B, grid) teacher-crop coordinates in [0, 1] when inside
    tx = (img_x - tb[:, 1]) / tb[:, 3]
    tx = torch.where(tb[:, 4] > 0.5, 1 - tx, tx)
    y = ty[:, :, None].expand(-1, -1, grid)
    x = tx[:, None, :].expand(-1, grid, -1)
    inside = (y >= 0) & (y < 1) & (x >= 0) & (x < 1)
    return torch.stack([2 * x - 1, 2 * y - 1], dim=-1), inside


def neighbour_points(points: Tensor, grid: int, radius: tuple[float, float], generator: torch.Generator
                     ) -> tuple[Tensor, Tensor]:
    """Move every point (B, g, g, 2) (``grid_sample`` coordinates of a crop with ``grid`` patches a
    side) by a random distance in ``radius`` (in patches) in a random direction.

    Returns the moved points and inside (B, g, g) bool: the moved point lies in the crop."""
    shape = points.shape[:-1]
    angle = torch.rand(shape, generator=generator) * (2 * math.pi)
    dist = radius[0] + torch.rand(shape, generator=generator) * (radius[1] - radius[0])
    step = torch.stack([angle.cos(), angle.sin()], dim=-1) * (dist * 2 / grid)[..., None]
    moved = points + step.to(points)
    return moved, (moved.abs() < 1).all(dim=-1)
