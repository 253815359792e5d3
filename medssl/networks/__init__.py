"""U-Net with a feature contract, task heads, and ``model.pt`` with its one loader (``load_network``)."""

from medssl.networks.model_file import LoadedNetwork, load_network, read_model_file, save_model
from medssl.networks.unet import FeatureInfo, UNet, build_network

__all__ = ["FeatureInfo", "LoadedNetwork", "UNet", "build_network", "load_network", "read_model_file", "save_model"]
