"""U-Net with a feature contract and the MLP heads the objectives build on it."""

from medssl.networks.unet import FeatureInfo, UNet, build_network

__all__ = ["FeatureInfo", "UNet", "build_network"]
