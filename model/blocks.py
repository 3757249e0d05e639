"""Convolution blocks whose layer order follows `[model] conv_order`."""
from __future__ import annotations

from torch import nn


class ConvUnit(nn.Sequential):
    """One 3x3 convolution with an activation and a batch norm, in the order given by `order`.

    `order` holds each of the letters c (conv), a (ReLU) and b (BatchNorm2d) once, e.g. 'cab'.
    Input (B, in_channels, H, W) -> output (B, out_channels, H, W), same dtype.
    """

    def __init__(self, in_channels: int, out_channels: int, order: str = "cab"):
        if sorted(order) != ["a", "b", "c"]:
            raise ValueError(f"conv order must use each of the letters a, b, c once, got {order!r}")
        layers = []
        channels = in_channels  # a batch norm placed before the conv sees the input channels
        for letter in order:
            if letter == "c":
                # A batch norm right after the conv subtracts the mean: a bias would be wasted.
                bias = not order.startswith("cb", order.index("c"))
                layers.append(nn.Conv2d(channels, out_channels, 3, padding=1, bias=bias))
                channels = out_channels
            elif letter == "a":
                # Not in-place: in orders starting with 'a' the input may be a skip tensor.
                layers.append(nn.ReLU())
            else:
                layers.append(nn.BatchNorm2d(channels))
        super().__init__(*layers)


class ConvBlock(nn.Sequential):
    """`n_conv` ConvUnits in a row (the usual U-Net level has two).

    Input (B, in_channels, H, W) -> output (B, out_channels, H, W), same dtype.
    """

    def __init__(self, in_channels: int, out_channels: int, order: str = "cab", n_conv: int = 2):
        units = [ConvUnit(in_channels if i == 0 else out_channels, out_channels, order)
                 for i in range(n_conv)]
        super().__init__(*units)
