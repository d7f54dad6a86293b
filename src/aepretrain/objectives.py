"""Pre-training objectives as small pieces: what each trains, the network it trains (the encoder's blocks and a
head) and its loss on a batch. ``pretrain`` runs any of them the same way; a new objective is a new class here.

An objective trains greedily (stage k: encoder block k and a new head, blocks 1..k-1 frozen, for k = 1..K) or
the whole encoder at once (one stage, K, nothing frozen). Its network is saved as the stage's checkpoint; a
classifier takes only the encoder's blocks from it, never the head.

Example:
    >>> from aepretrain.config import PretrainConfig, resolve
    >>> [(name, objective_of(PretrainConfig(objective=name)).stages(3)) for name in ("greedy", "simclr")]
    [('greedy', [1, 2, 3]), ('simclr', [3])]
    >>> from aepretrain.models import build_encoder
    >>> byol = objective_of(PretrainConfig(objective="byol"))
    >>> network = byol.network(build_encoder(resolve("tiny").model, 3, False), 3)
    >>> 0 < float(byol.loss(network, torch.rand(8, 3, 16, 16)).detach()) <= 8
    True
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .config import PretrainConfig
from .losses import byol_loss, masked_mse, nt_xent, patch_mask
from .models import Autoencoder, Encoder, MomentumPair, Projected
from .transforms import two_views


class Objective:
    """What every objective declares: its name, whether it trains greedily, the kind of checkpoint its network is
    saved as, whether that network reconstructs images; its network, its loss, and what follows an optimizer step.
    The defaults are the autoencoders'."""

    name: ClassVar[str]
    greedy: ClassVar[bool] = True  # one stage per block, earlier blocks frozen; False: every block at once
    kind: ClassVar[str] = "autoencoder"  # the kind of checkpoint its network is saved as
    reconstructs: ClassVar[bool] = True  # its network outputs images: tested by reconstruction error, figured
    loss_name: ClassVar[str] = "reconstruction MSE"  # what its loss is, for figures and tables

    def __init__(self, settings: PretrainConfig) -> None:
        self.settings = settings

    def stages(self, depth: int) -> list[int]:
        """The stages trained in turn; stage k trains encoder blocks 1..k."""
        return list(range(1, depth + 1)) if self.greedy else [depth]

    def network(self, encoder: Encoder, stage: int) -> nn.Module:
        """Stage ``stage``'s network: the encoder's blocks 1..stage (1..stage-1 frozen when greedy) and a new head."""
        return Autoencoder(encoder, stage, frozen=None if self.greedy else 0)

    @property
    def learning_rate(self) -> float:
        """The optimizer's (peak) learning rate for this objective's networks."""
        return self.settings.lr

    def loss(self, network: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The loss of a batch of float images (NCHW, [0, 1]), computed in fp32."""
        raise NotImplementedError

    def after_step(self, network: nn.Module, step: int, total_steps: int) -> None:
        """Called after each optimizer step (``step`` of ``total_steps``, counted from 1)."""


class Greedy(Objective):
    """The reference: each stage's autoencoder reconstructs its input, by pixel MSE."""

    name = "greedy"

    def loss(self, network: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(network(x).float(), x.float())


class Denoising(Objective):
    """Gaussian noise on the input, the clean image as the target."""

    name = "greedy-denoising"

    def loss(self, network: nn.Module, x: torch.Tensor) -> torch.Tensor:
        noisy = (x + self.settings.noise_std * torch.randn_like(x)).clamp(0, 1)
        return F.mse_loss(network(noisy).float(), x.float())


class Masked(Objective):
    """Random square patches blanked out of the input; the error counts the masked pixels only."""

    name = "greedy-masked"
    loss_name = "MSE of the masked pixels"

    def loss(self, network: nn.Module, x: torch.Tensor) -> torch.Tensor:
        s = self.settings
        mask = patch_mask(x, s.mask_patch or max(1, x.shape[-1] // 8), s.mask_ratio)
        return masked_mse(network(x * (1 - mask)).float(), x.float(), mask)


class EndToEnd(Greedy):
    """The plain autoencoder with every block and the full decoder trained at once."""

    name = "end-to-end"
    greedy = False


class SimCLR(Objective):
    """Two augmented views of each image, projected; NT-Xent pulls twins together and pushes the rest of the batch
    apart (Chen et al. 2020)."""

    name = "simclr"
    greedy = False
    kind = "contrastive"
    reconstructs = False
    loss_name = "NT-Xent"

    def network(self, encoder: Encoder, stage: int) -> nn.Module:
        s = self.settings
        return Projected(encoder, stage, None if self.greedy else 0, s.hidden_dim, s.projection_dim)

    def loss(self, network: nn.Module, x: torch.Tensor) -> torch.Tensor:
        z1, z2 = network(torch.cat(two_views(x))).float().chunk(2)
        return nt_xent(z1, z2, self.settings.temperature)


class BYOL(SimCLR):
    """Two augmented views; the online network predicts the momentum target's projection of the other view
    (Grill et al. 2020). No negatives: the predictor and the slowly moving target keep it from collapsing.
    Without negatives it is also more sensitive to the learning rate than SimCLR: with Adam at 2e-3 (the small
    presets' rate) the online network's features collapse to a few directions in the first epoch of a short run,
    and at 5e-4 they do not (tests/test_objectives.py): hence a rate of its own, ``pretrain.byol_lr``."""

    name = "byol"
    loss_name = "2 - 2 cos, both views"

    @property
    def learning_rate(self) -> float:
        return self.settings.lr if self.settings.byol_lr is None else self.settings.byol_lr

    def network(self, encoder: Encoder, stage: int) -> nn.Module:
        return MomentumPair(super().network(encoder, stage), self.settings.hidden_dim)

    def loss(self, network: nn.Module, x: torch.Tensor) -> torch.Tensor:
        views = torch.cat(two_views(x))
        p1, p2 = network(views).float().chunk(2)
        with torch.no_grad():
            t1, t2 = network.target(views).float().chunk(2)
        return byol_loss(p1, p2, t1, t2)

    def after_step(self, network: nn.Module, step: int, total_steps: int) -> None:
        network.update_target(momentum_at(self.settings.momentum, step, total_steps))


def momentum_at(base: float, step: int, total_steps: int) -> float:
    """BYOL's target momentum after ``step`` of ``total_steps``: from ``base`` up to 1 by a half cosine,
    1 - (1 - base) (cos(pi step / total) + 1) / 2.

    >>> momentum_at(0.99, 0, 100), momentum_at(0.99, 50, 100), momentum_at(0.99, 100, 100)
    (0.99, 0.995, 1.0)
    """
    return 1 - (1 - base) * (math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)) + 1) / 2


OBJECTIVES: dict[str, type[Objective]] = {o.name: o for o in (Greedy, Denoising, Masked, EndToEnd, SimCLR, BYOL)}
KINDS = tuple(dict.fromkeys(o.kind for o in OBJECTIVES.values()))  # the checkpoint kinds of pre-trained networks


def objective_of(settings: PretrainConfig) -> Objective:
    """The objective ``settings.objective`` names, with its settings (checked against config.OBJECTIVES before)."""
    return OBJECTIVES[settings.objective](settings)
