"""Task heads for fine-tuning: the U-Net plus a 1x1 convolution on its dense stride-1 features.

``TaskUNet`` keeps ``UNet``'s module names and adds MONAI ``BasicUNet``'s ``final_conv``, so a depth-4 fine-tuned
state dict loads strictly into ``monai.networks.nets.BasicUNet(spatial_dims, 1, head_channels, features=channels,
norm=..., act=...)`` and a pretrained ``UNet`` state dict loads into it with only ``final_conv`` missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping

import torch
from monai.networks.layers import Conv
from torch import nn

from medssl.errors import InputError
from medssl.networks.unet import UNet

HEAD = "final_conv"
#: the network's parts, in the order the optimizer groups them (layer-wise learning rates)
PARTS = ("encoder", "decoder", "head")


@dataclass(frozen=True)
class TaskHead:
    """What a fine-tuned head predicts, as ``model.pt`` records it (``to_dict``): ``seg`` (one channel per class of
    ``classes``) or ``landmarks`` (one Gaussian heatmap of ``sigma_mm`` per name of ``names``)."""

    kind: Literal["seg", "landmarks"]
    classes: tuple[int, ...] = ()
    names: tuple[str, ...] = ()
    sigma_mm: float | None = None

    @property
    def channels(self) -> int:
        """The head's output channels."""
        return len(self.classes) if self.kind == "seg" else len(self.names)

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "seg":
            return {"kind": "seg", "classes": list(self.classes)}
        return {"kind": "landmarks", "names": list(self.names), "sigma_mm": self.sigma_mm}

    @classmethod
    def from_dict(cls, task: Any) -> "TaskHead | None":
        """The head a ``model.pt`` payload's ``task`` entry describes (None when it describes none)."""
        if not isinstance(task, Mapping) or task.get("kind") not in ("seg", "landmarks"):
            return None
        if task["kind"] == "seg":
            return cls("seg", classes=tuple(int(c) for c in task.get("classes", ())))
        return cls("landmarks", names=tuple(str(n) for n in task.get("names", ())), sigma_mm=task.get("sigma_mm"))


class TaskUNet(UNet):
    """``UNet`` with a task head: ``(B, in_channels, *S) -> (B, head_channels, *S)`` (logits or heatmaps).

    ``head_channels`` is the number of classes (segmentation) or landmarks (heatmaps); ``unet_options`` are
    ``UNet``'s arguments (``size``, ``channels``, ``dropout``, ``norm``, ``in_channels``).
    """

    def __init__(self, spatial_dims: int, head_channels: int, **unet_options: Any):
        super().__init__(spatial_dims, **unet_options)
        if head_channels < 1:
            raise InputError(f"a task head needs at least one output channel, got {head_channels}")
        self.head_channels = int(head_channels)
        self.final_conv = Conv["conv", spatial_dims](self.out_channels, self.head_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_conv(super().forward(x))  # (B, head_channels, *S)

    def get_config(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this network with ``TaskUNet(**config)``."""
        return {**super().get_config(), "head_channels": self.head_channels}

    def parts(self) -> dict[str, list[nn.Module]]:
        """The modules of each part: ``encoder`` (``conv_0``, ``down_*``), ``decoder`` (``upcat_*``), ``head``."""
        encoder = [self.conv_0] + [getattr(self, f"down_{level}") for level in range(1, self.depth + 1)]
        decoder = [getattr(self, f"upcat_{level}") for level in range(self.depth, 0, -1)]
        return {"encoder": encoder, "decoder": decoder, "head": [self.final_conv]}

    def load_backbone(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load a ``UNet`` (or another ``TaskUNet``'s) state dict into everything but the head; the head keeps its
        initialisation. ``InputError`` when the architectures differ."""
        backbone = {key: value for key, value in state_dict.items() if not key.startswith(f"{HEAD}.")}
        try:
            missing, unexpected = self.load_state_dict(backbone, strict=False)
        except RuntimeError as error:  # shape mismatch
            raise InputError(f"checkpoint weights do not fit the network: {str(error).splitlines()[-1].strip()}") \
                from None
        missing = [key for key in missing if not key.startswith(f"{HEAD}.")]
        if missing or unexpected:
            raise InputError(f"checkpoint weights do not fit the network (missing: {missing[:3]}, "
                             f"unexpected: {unexpected[:3]})")
