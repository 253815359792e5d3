"""The U-Net encoder-decoder with a feature contract (``forward``, ``forward_features``, ``feature_info``).

Built from MONAI's ``BasicUNet`` blocks (``TwoConv``, ``Down``, ``UpCat``) with the same module names, so a depth-4
``UNet``'s ``state_dict`` also loads into a stock ``monai.networks.nets.BasicUNet`` (see ``UNet``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from monai.networks.nets.basic_unet import Down, TwoConv, UpCat
from torch import nn

from medssl.errors import InputError
from medssl.registry import look_up

#: channel widths ``(c_0, ..., c_L, c_out)``: encoder level ``l`` has ``c_l`` channels at stride ``2**l``, the
#: decoder mirrors the encoder and its last (stride 1) level has ``c_out`` channels (MONAI ``BasicUNet`` layout)
SIZES: dict[str, tuple[int, ...]] = {
    "small": (8, 16, 32, 64, 128, 16),  # 3D 64^3 x 2 forward+backward ~1.6 s on 2 CPU cores
    "base": (32, 32, 64, 128, 256, 32),  # = BasicUNet's default features
}
NORMS: dict[str, tuple[str, dict[str, Any]]] = {
    "instance": ("instance", {"affine": True}),
    "batch": ("batch", {"affine": True}),
}
ACTIVATION = ("LeakyReLU", {"negative_slope": 0.1, "inplace": True})


@dataclass(frozen=True)
class FeatureInfo:
    """One entry of ``UNet.feature_info``: a feature map's channel count, stride (per axis) and tap name."""

    channels: int
    stride: int
    name: str


class UNet(nn.Module):
    """U-Net for ``spatial_dims`` 2 or 3 (one code path) returning dense stride-1 features.

    ``size`` picks the channel widths (``SIZES``) unless ``channels`` = ``(c_0, ..., c_L, c_out)`` is given; the depth
    ``L = len(channels) - 2`` sets ``min_size_divisor = 2**L``. ``norm`` is ``"instance"`` (default: BatchNorm on 3D
    batches of 2 is poor) or ``"batch"``.

    Loading into stock MONAI: for depth 4 (both ``SIZES``) the module names and shapes are those of
    ``BasicUNet(spatial_dims, in_channels, out_channels=K, features=channels, norm=<NORMS[norm]>, dropout=dropout)``;
    ``basic.load_state_dict(unet.state_dict(), strict=False)`` loads every weight and reports only BasicUNet's final
    1x1 ``final_conv`` (a task head this feature network does not have) as missing.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int = 1,
        size: str = "small",
        channels: Sequence[int] | None = None,
        dropout: float = 0.0,
        norm: str = "instance",
    ):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise InputError(f"network spatial_dims must be 2 or 3, got {spatial_dims!r}")
        if channels is None:
            channels = look_up(size, SIZES, what="network size")
        channels = tuple(int(c) for c in channels)
        if len(channels) < 3 or min(channels) < 1:
            raise InputError(f"network channels must be >= 3 positive widths (c_0, ..., c_L, c_out), got {channels}")
        norm_args = look_up(norm, NORMS, what="network norm")
        self.spatial_dims, self.in_channels, self.size = spatial_dims, int(in_channels), size
        self.channels, self.dropout, self.norm = channels, float(dropout), norm
        depth = len(channels) - 2
        self.depth = depth
        self.conv_0 = TwoConv(spatial_dims, in_channels, channels[0], ACTIVATION, norm_args, True, dropout)
        for level in range(1, depth + 1):
            down = Down(spatial_dims, channels[level - 1], channels[level], ACTIVATION, norm_args, True, dropout)
            self.add_module(f"down_{level}", down)
        decoder_in = channels[depth]
        for level in range(depth, 0, -1):
            out = channels[level - 1] if level > 1 else channels[-1]
            up = UpCat(spatial_dims, decoder_in, channels[level - 1], out, ACTIVATION, norm_args, True, dropout,
                       halves=level > 1)
            self.add_module(f"upcat_{level}", up)
            decoder_in = out
        self.out_channels = channels[-1]
        self.min_size_divisor = 2**depth
        self.feature_info: list[FeatureInfo] = [FeatureInfo(channels[depth], 2**depth, "bottleneck")]
        for level in range(depth, 0, -1):
            stride = 2 ** (level - 1)
            width = channels[level - 1] if level > 1 else channels[-1]
            self.feature_info.append(FeatureInfo(width, stride, f"dec_{stride}"))

    def get_config(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this network with ``build_network(**config)``."""
        return {
            "spatial_dims": self.spatial_dims,
            "in_channels": self.in_channels,
            "size": self.size,
            "channels": list(self.channels),
            "dropout": self.dropout,
            "norm": self.norm,
        }

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``InputError`` unless ``x`` is ``(B, in_channels, *S)`` with every size divisible by the divisor."""
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise InputError(
                f"network input must have shape (B, {self.in_channels}, {', '.join('S' * self.spatial_dims)}), "
                f"got {tuple(x.shape)}"
            )
        sizes = tuple(x.shape[2:])
        if any(s % self.min_size_divisor for s in sizes):
            raise InputError(
                f"network input size {sizes} must be divisible by {self.min_size_divisor} (the U-Net halves it "
                f"{self.depth} times); choose a patch/image size that is a multiple of {self.min_size_divisor}"
            )

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``[bottleneck, decoder levels coarse -> fine]``; shapes ``(B, info.channels, *S / info.stride)`` in the
        order of ``feature_info``; the last one has stride 1."""
        self.check_input(x)
        skips = [self.conv_0(x)]
        for level in range(1, self.depth + 1):
            skips.append(getattr(self, f"down_{level}")(skips[-1]))
        features = [skips[-1]]
        for level in range(self.depth, 0, -1):
            features.append(getattr(self, f"upcat_{level}")(features[-1], skips[level - 1]))
        return features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dense stride-1 features ``(B, out_channels, *S)``."""
        return self.forward_features(x)[-1]


def build_network(**config: Any) -> UNet:
    """The network described by ``config`` (``UNet`` keyword arguments, e.g. from ``UNet.get_config()``)."""
    return UNet(**config)
