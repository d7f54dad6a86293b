"""The objectives' losses, on plain tensors: masked reconstruction, NT-Xent (SimCLR) and BYOL's normalised cosine.

Example:
    >>> z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> round(float(nt_xent(z, z, temperature=1.0)), 4)  # log(1 + 2 e^-1): each view's twin beside two others
    0.5514
    >>> float(byol_loss(z, z, z, z))  # the predictions point where the targets do
    0.0
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def patch_mask(x: torch.Tensor, patch: int, ratio: float) -> torch.Tensor:
    """1 on randomly chosen square patches (``ratio`` of them), 0 elsewhere; one mask per image, shape N1HW."""
    n, _, h, w = x.shape
    grid = torch.rand(n, 1, -(-h // patch), -(-w // patch), device=x.device) < ratio
    return grid.repeat_interleave(patch, 2).repeat_interleave(patch, 3)[:, :, :h, :w].to(x.dtype)


def masked_mse(reconstruction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over masked pixels only (mask N1HW broadcast over channels)."""
    mask = mask.expand_as(target)
    return ((reconstruction - target) ** 2 * mask).sum() / mask.sum().clamp(min=1)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's normalised temperature-scaled cross-entropy (Chen et al. 2020, eq. 1), averaged over all 2N views.

    Row i of ``z1`` and row i of ``z2`` are the two views of image i. Each of the 2N projections, L2-normalised, is
    a softmax classifier over the other 2N - 1 by cosine similarity / ``temperature``, and its twin is the right
    answer: l(i, j) = -log(exp(s_ij / t) / sum_{k != i} exp(s_ik / t)).
    """
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = len(z1)
    logits = (z @ z.T / temperature).masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    twins = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, twins)


def normalized_cosine(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BYOL's loss of one direction (Grill et al. 2020, eq. 2): the squared distance of the L2-normalised vectors,
    2 - 2 cos(prediction, target), averaged over the batch. ``target`` takes no gradient."""
    p, t = F.normalize(prediction, dim=1), F.normalize(target.detach(), dim=1)
    return (p - t).pow(2).sum(1).mean()


def byol_loss(p1: torch.Tensor, p2: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor) -> torch.Tensor:
    """BYOL's symmetrised loss: view 1's prediction against view 2's target projection, plus the other way round
    (the paper's L + L~, from 0 to 8)."""
    return normalized_cosine(p1, t2) + normalized_cosine(p2, t1)
