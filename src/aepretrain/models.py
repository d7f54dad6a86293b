"""The reference networks, built from a spec: encoder blocks, one decoder per greedy stage, the classifier; and the
contrastive objectives' networks (a projection head; BYOL's predictor and momentum target).

Every network reads the encoder through one path, ``Encoder.forward_features`` (the feature map after each block),
and pools it one way, ``global_avg_pool``.

Parameters are counted the way the reference (Keras) counts them, so the numbers of the lab
report are exact targets: BatchNorm has 4 x C parameters (gamma and beta trainable, the moving
mean and variance not), and the parameters of frozen blocks are non-trainable.

Example:
    >>> from aepretrain.config import ModelConfig
    >>> spec = ModelConfig()
    >>> clf = Classifier(Encoder(spec, in_channels=3, stride=spec.classifier_stride), 37, spec.dropout)
    >>> summarize(clf, (3, 224, 224))["total"]
    1128997
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .config import ModelConfig


def conv_bn_relu(cin: int, cout: int, kernel: int, spec: ModelConfig, n: int, stride: int = 1) -> dict[str, nn.Module]:
    # padding k//2 is Keras' "same" for odd kernels, at stride 1 and 2 alike
    return {
        f"conv{n}": nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2),
        f"bn{n}": nn.BatchNorm2d(cout, eps=spec.bn_eps, momentum=spec.bn_momentum),
        f"relu{n}": nn.ReLU(inplace=True),
    }


def initialize(module: nn.Module, scheme: str) -> nn.Module:
    """``keras``: Glorot-uniform kernels and zero biases for every convolution and dense layer, as Keras starts
    them; ``pytorch``: PyTorch's own initialisation, left as it is (no draw is made)."""
    if scheme == "keras":
        for layer in module.modules():
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(layer.weight)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
    return module


class Encoder(nn.Module):
    """The convolutional blocks shared by the autoencoders and the classifier."""

    def __init__(self, spec: ModelConfig, in_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.spec, self.in_channels, self.stride = spec, in_channels, stride
        blocks, cin = [], in_channels
        for b, block in enumerate(spec.blocks):
            layers: dict[str, nn.Module] = {}
            for i, cout in enumerate(block.channels):
                first = b == 0 and i == 0
                layers |= conv_bn_relu(cin, cout, block.kernel, spec, i + 1, stride if first else 1)
                cin = cout
            layers["pool"] = nn.MaxPool2d(2)
            blocks.append(nn.Sequential(OrderedDict(layers)))
        self.blocks = nn.ModuleList(blocks)
        self.out_channels = cin
        initialize(self, spec.init)

    def forward_features(self, x: torch.Tensor, depth: int | None = None) -> list[torch.Tensor]:
        """The feature map after each of blocks 1..depth (every block by default), from one pass."""
        maps = []
        for block in self.blocks[:depth]:
            x = block(x)
            maps.append(x)
        return maps

    def forward(self, x: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        return self.forward_features(x, depth)[-1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The feature map averaged over space: one vector per image, as the classifier's head takes it."""
        return global_avg_pool(self(x))


def global_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """A feature map (N, C, H, W) averaged over space: (N, C)."""
    return x.mean(dim=(2, 3))


def stage_decoder(spec: ModelConfig, stage: int, in_channels: int, first_stride: int) -> nn.Sequential:
    """The decoder of greedy stage ``stage``: it mirrors encoder blocks stage..1, as the reference lists it.

    Each mirrored block repeats its convolutions (Conv + BN + ReLU), then nearest UpSampling x2;
    a final Conv 3x3 maps to the input channels, linear.
    """
    layers: dict[str, nn.Module] = {}
    cin, n = spec.blocks[stage - 1].channels[-1], 0
    for b in range(stage, 0, -1):
        block = spec.blocks[b - 1]
        for cout in block.channels:
            n += 1
            layers |= conv_bn_relu(cin, cout, block.kernel, spec, n)
            cin = cout
        layers[f"up{b}"] = nn.Upsample(scale_factor=2, mode="nearest")
    if first_stride > 1:  # undo a strided first convolution too, so the output matches the input
        layers["up0"] = nn.Upsample(scale_factor=first_stride, mode="nearest")
    layers["output"] = nn.Conv2d(cin, in_channels, 3, padding=1)
    return initialize(nn.Sequential(OrderedDict(layers)), spec.init)


class StageModel(nn.Module):
    """Encoder blocks 1..stage, shared with the encoder, of which 1..frozen are frozen: what every objective trains.

    Frozen means no gradients and BatchNorm statistics kept: the frozen blocks stay in eval mode even when
    Lightning calls ``train()`` at each epoch. ``frozen=0`` trains every block (the end-to-end objectives).
    """

    def __init__(self, encoder: Encoder, stage: int, frozen: int | None = None) -> None:
        super().__init__()
        self.stage = stage
        self.frozen = stage - 1 if frozen is None else frozen
        self.blocks = nn.ModuleList(encoder.blocks[:stage])  # registered here, so the weights are named blocks.N
        object.__setattr__(self, "encoder", encoder)  # not a submodule: its later blocks are no part of this stage
        for b, block in enumerate(self.blocks):
            block.requires_grad_(b >= self.frozen)
        self.train()

    def train(self, mode: bool = True) -> "StageModel":
        super().train(mode)
        for block in self.blocks[: self.frozen]:
            block.eval()
        return self

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.forward_features(x, self.stage)[-1]


class Autoencoder(StageModel):
    """Greedy stage k: encoder blocks 1..k, of which 1..k-1 are frozen (``frozen`` says otherwise), and a new
    decoder."""

    def __init__(self, encoder: Encoder, stage: int, frozen: int | None = None) -> None:
        super().__init__(encoder, stage, frozen)
        self.decoder = stage_decoder(encoder.spec, stage, encoder.in_channels, encoder.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encode(x))


def mlp_head(in_features: int, hidden: int, out_features: int, init: str) -> nn.Sequential:
    """Linear, BatchNorm, ReLU, Linear: the projection head (Chen et al. 2020) and BYOL's predictor (Grill et al.
    2020)."""
    return initialize(nn.Sequential(OrderedDict(
        linear1=nn.Linear(in_features, hidden), bn1=nn.BatchNorm1d(hidden), relu1=nn.ReLU(inplace=True),
        linear2=nn.Linear(hidden, out_features))), init)


class Projected(StageModel):
    """Encoder blocks 1..stage and a projection head on their pooled output: SimCLR's network, BYOL's online and
    target networks."""

    def __init__(self, encoder: Encoder, stage: int, frozen: int | None, hidden: int, out_features: int) -> None:
        super().__init__(encoder, stage, frozen)
        width = encoder.spec.blocks[stage - 1].channels[-1]
        self.projector = mlp_head(width, hidden, out_features, encoder.spec.init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(global_avg_pool(self.encode(x)))


class MomentumPair(nn.Module):
    """BYOL's networks: the online network with its predictor, and a target network of the same shape that follows
    the online one as an exponential moving average of its weights and takes no gradients."""

    def __init__(self, online: Projected, hidden: int) -> None:
        super().__init__()
        self.online = online
        width = online.projector.linear2.out_features
        self.predictor = mlp_head(width, hidden, width, online.encoder.spec.init)
        self.target = copy.deepcopy(online).requires_grad_(False)  # starts as the online network
        self.stage = online.stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The online network's prediction of the target's projection."""
        return self.predictor(self.online(x))

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        ema_update(self.target, self.online, momentum)


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target <- momentum x target + (1 - momentum) x online, for every parameter (the buffers, BatchNorm's
    statistics, are the target's own)."""
    for t, o in zip(target.parameters(), online.parameters(), strict=True):
        t.lerp_(o.detach(), 1 - momentum)


class GlobalAvgPool(nn.Module):
    """``global_avg_pool`` as a layer, so that the classifier's summary lists it as the reference's table does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return global_avg_pool(x)


class Classifier(nn.Module):
    """Encoder + GlobalAveragePooling + Dropout + Dense; returns logits (softmax is in the loss)."""

    def __init__(self, encoder: Encoder, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.encoder = encoder
        self.pool = GlobalAvgPool()
        self.dropout = nn.Dropout(dropout)
        self.dense = initialize(nn.Linear(encoder.out_channels, num_classes), encoder.spec.init)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.encoder(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(self.dropout(self.features(x)))


def _keras_counts(module: nn.Module) -> tuple[int, int]:
    """(trainable, non-trainable) of one leaf layer, as Keras counts them."""
    trainable = sum(p.numel() for p in module.parameters(recurse=False) if p.requires_grad)
    frozen = sum(p.numel() for p in module.parameters(recurse=False) if not p.requires_grad)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
        frozen += module.running_mean.numel() + module.running_var.numel()
    return trainable, frozen


def summarize(model: nn.Module, input_shape: tuple[int, int, int]) -> dict[str, Any]:
    """Layers with output shapes (H, W, C as Keras prints them) and Keras-style parameter counts."""
    shapes: dict[str, list[int]] = {}
    shadow = copy.deepcopy(model).to("meta").eval()  # shapes without compute, the model untouched
    for name, module in shadow.named_modules():
        def record(_m: nn.Module, _i: Any, out: torch.Tensor, name: str = name) -> None:
            shapes[name] = [out.shape[2], out.shape[3], out.shape[1]] if out.dim() == 4 else list(out.shape[1:])
        module.register_forward_hook(record)
    with torch.no_grad():
        shadow(torch.empty((1, *input_shape), device="meta"))
    leaves = [(name, m) for name, m in model.named_modules() if not list(m.children())]
    layers, trainable, non_trainable = [], 0, 0
    for name, module in leaves:
        t, n = _keras_counts(module)
        trainable, non_trainable = trainable + t, non_trainable + n
        layers.append({"name": name, "type": type(module).__name__, "output_shape": shapes.get(name), "params": t + n})
    return {"layers": layers, "total": trainable + non_trainable, "trainable": trainable, "non_trainable": non_trainable}


def build_encoder(spec: ModelConfig, in_channels: int, for_classifier: bool) -> Encoder:
    return Encoder(spec, in_channels, spec.classifier_stride if for_classifier else spec.autoencoder_stride)


def summary(spec: ModelConfig, image_size: int, in_channels: int, num_classes: int) -> dict[str, Any]:
    """The classifier and each greedy stage's autoencoder, as `aepretrain summary` prints them."""
    shape = (in_channels, image_size, image_size)
    classifier = Classifier(build_encoder(spec, in_channels, True), num_classes, spec.dropout)
    stages = []
    for stage in range(1, len(spec.blocks) + 1):
        ae = Autoencoder(build_encoder(spec, in_channels, False), stage)
        stages.append({"stage": stage, **summarize(ae, shape)})
    return {"input_shape": [image_size, image_size, in_channels], "classifier": summarize(classifier, shape),
            "stages": stages}


@contextmanager
def evaluating_on(model: nn.Module, device: torch.device | None = None) -> Iterator[torch.device]:
    """``model`` in eval mode on ``device`` (its own where None) for the block, which gets the device; then back
    where it was, in the mode it was in (Lightning hands a model back on the CPU after a fit)."""
    home, was_training = next(model.parameters()).device, model.training
    device = home if device is None else device
    model.to(device).eval()
    try:
        yield device
    finally:
        model.to(home).train(was_training)
