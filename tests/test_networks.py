"""The U-Net feature contract: shapes, feature_info, config round trip, stock-MONAI loading, input errors."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import BasicUNet

from medssl.errors import InputError
from medssl.networks import FeatureInfo, UNet, build_network
from medssl.networks.unet import NORMS


@pytest.mark.parametrize("dims", [2, 3])
def test_forward_features_match_feature_info(dims):
    net = UNet(dims, in_channels=2, channels=(4, 8, 8, 16, 6))
    size = 16
    x = torch.randn(2, 2, *[size] * dims)
    features = net.forward_features(x)
    assert [info.name for info in net.feature_info] == ["bottleneck", "dec_4", "dec_2", "dec_1"]
    assert net.min_size_divisor == 8 and net.out_channels == 6
    for feature, info in zip(features, net.feature_info):
        assert isinstance(info, FeatureInfo)
        assert feature.shape == (2, info.channels, *[size // info.stride] * dims)
    assert torch.equal(net(x), features[-1])
    assert net.feature_info[-1].stride == 1


@pytest.mark.parametrize("size", ["small", "base"])
def test_named_sizes_have_four_levels(size):
    net = UNet(2, size=size)
    assert [info.stride for info in net.feature_info] == [16, 8, 4, 2, 1]
    assert net(torch.randn(1, 1, 32, 32)).shape == (1, net.out_channels, 32, 32)


@pytest.mark.parametrize("dims", [2, 3])
def test_state_dict_round_trip_through_config(dims):
    net = UNet(dims, channels=(4, 8, 16, 4), norm="batch", dropout=0.1).eval()
    rebuilt = build_network(**net.get_config()).eval()
    rebuilt.load_state_dict(net.state_dict())  # strict: same keys, no surgery
    x = torch.randn(2, 1, *[8] * dims)
    assert torch.equal(net(x), rebuilt(x))
    assert rebuilt.get_config() == net.get_config()


def test_weights_load_into_stock_monai_basic_unet():
    net = UNet(2, size="small").eval()
    basic = BasicUNet(2, 1, 3, features=net.channels, norm=NORMS[net.norm], dropout=net.dropout).eval()
    result = basic.load_state_dict(net.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert sorted(result.missing_keys) == ["final_conv.bias", "final_conv.weight"]
    captured = {}
    basic.upcat_1.register_forward_hook(lambda module, inputs, output: captured.setdefault("dense", output))
    x = torch.randn(1, 1, 32, 32)
    basic(x)
    assert torch.allclose(captured["dense"], net(x), atol=1e-6)


def test_input_size_not_divisible_is_a_clear_error():
    net = UNet(3, channels=(4, 8, 16, 4))
    with pytest.raises(InputError, match="divisible by 4"):
        net(torch.randn(1, 1, 8, 8, 10))
    with pytest.raises(InputError, match="shape"):
        net(torch.randn(1, 2, 8, 8, 8))


@pytest.mark.parametrize(
    "kwargs, message",
    [({"size": "huge"}, "unknown network size"), ({"norm": "layer"}, "unknown network norm"),
     ({"size": "smal"}, r"unknown network size 'smal' \(did you mean 'small'\?\); choose one of: small, base"),
     ({"norm": "batchnorm"}, r"unknown network norm 'batchnorm' \(did you mean 'batch'\?\); choose one of: instance"),
     ({"channels": (8, 8)}, "channels"), ({"spatial_dims": 1}, "spatial_dims")],
)
def test_bad_arguments_are_rejected(kwargs, message):
    with pytest.raises(InputError, match=message):
        UNet(**{"spatial_dims": 2, **kwargs})
