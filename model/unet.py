"""The U-Net family: unet (semantic), caunet (+ contour), camunet (+ contour + marker)."""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from config import ModelConfig
from model.blocks import ConvBlock
from model.encoders import build_encoder


class Decoder(nn.Module):
    """U-Net decoder: from the deepest encoder stage back to stride 1.

    At each level a 2x2 transposed conv doubles the resolution, the encoder's skip feature of
    that stride is concatenated and a ConvBlock mixes them. The level at stride s has
    n_filter * s channels (the classic U-Net widths), so the output has n_filter channels.

    forward(features): encoder outputs, entry i (B, enc_channels[i], H / strides[i], W / ...)
    -> (B, n_filter, H, W).
    """

    def __init__(self, enc_channels: tuple[int, ...], strides: tuple[int, ...], n_filter: int,
                 order: str):
        super().__init__()
        self.ups = nn.ModuleList()
        self.blocks = nn.ModuleList()
        in_channels = enc_channels[-1]
        for skip_channels, stride in zip(enc_channels[-2::-1], strides[-2::-1]):
            width = n_filter * stride
            self.ups.append(nn.ConvTranspose2d(in_channels, width, 2, stride=2))
            self.blocks.append(ConvBlock(width + skip_channels, width, order))
            in_channels = width
        self.out_channels = in_channels

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = features[-1]
        for up, block, skip in zip(self.ups, self.blocks, features[-2::-1]):
            x = block(torch.cat([up(x), skip], dim=1))
        return x


class UNet(nn.Module):
    """Encoder, decoder(s) and one 1x1 conv head per output map.

    Input: float image batch (B, 3, H, W), values in [0, 1], H and W multiples of `stride`.
    The model normalises it with the encoder's mean / std (non-persistent buffers, so they
    never enter checkpoints).
    forward(x) -> {head name: logits (B, 1, H, W)}, in the autocast dtype when autocast is on.
    predict(x) -> {head name: float32 probabilities in [0, 1], (B, 1, H, W)}.

    Attributes: config (the ModelConfig), heads (tuple of head names), stride (int),
    encoder, decoders (ModuleDict: key 'shared', or one key per head), head_convs (ModuleDict
    keyed by head name).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.heads = cfg.heads
        self.encoder, spec = build_encoder(cfg)
        self.stride = self.encoder.strides[-1]
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        names = ("shared",) if cfg.shared_decoder else self.heads
        self.decoders = nn.ModuleDict({
            name: Decoder(self.encoder.channels, self.encoder.strides, cfg.n_filter, cfg.conv_order)
            for name in names})
        width = next(iter(self.decoders.values())).out_channels
        self.head_convs = nn.ModuleDict({name: nn.Conv2d(width, 1, 1) for name in self.heads})
        self._encoder_frozen = False

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected an image batch of shape (B, 3, H, W), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        s = self.stride
        if h % s or w % s:
            low = f"{max(s, h // s * s)}x{max(s, w // s * s)}"
            high = f"{-(-h // s) * s}x{-(-w // s) * s}"
            raise ValueError(f"input size {h}x{w} is not a multiple of the network stride {s}; "
                             f"nearest valid sizes: {low} or {high}")

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self._check_input(x)
        features = self.encoder((x - self.mean) / self.std)
        if self.config.shared_decoder:
            shared = self.decoders["shared"](features)
            return {name: self.head_convs[name](shared) for name in self.heads}
        return {name: self.head_convs[name](self.decoders[name](features)) for name in self.heads}

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Sigmoid probabilities without autograd; call .eval() first for inference."""
        return {name: torch.sigmoid(logits.float()) for name, logits in self(x).items()}

    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        return self.encoder.parameters()

    def freeze_encoder(self, flag: bool) -> None:
        """flag True: encoder weights get no gradients and its batch norms keep their running
        statistics (eval mode) even in train(); False: undo both."""
        self._encoder_frozen = flag
        for p in self.encoder.parameters():
            p.requires_grad_(not flag)
        self.train(self.training)

    def train(self, mode: bool = True) -> "UNet":
        super().train(mode)
        if self._encoder_frozen:
            # Updating BN statistics would change a frozen encoder's output all the same.
            for m in self.encoder.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self
