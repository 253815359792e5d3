"""Information maps: torch entropy vs skimage, categories, anchor sampling statistics, PNG."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import chisquare
from skimage.filters.rank import entropy as skimage_entropy
from skimage.morphology import ball, disk

from medssl.transforms.infomap import (entropy_footprint, info_categories, information_map, histogram_percentiles,
                                       sample_anchors, save_information_png)


def test_footprint_equals_skimage_disk_and_ball_at_unit_spacing():
    assert np.array_equal(entropy_footprint((1.0, 1.0), 3.0).numpy(), disk(3).astype(bool))
    assert np.array_equal(entropy_footprint((1.0, 1.0, 1.0), 2.0).numpy(), ball(2).astype(bool))


@pytest.mark.parametrize("spacing_mm, shape", [((1.0, 1.0), (37, 29)), ((0.5, 1.25), (31, 26)),
                                               ((0.8, 1.0, 2.0), (17, 15, 9))])
def test_entropy_matches_skimage_rank_entropy(spacing_mm, shape):
    rng = np.random.default_rng(3)
    ramp = np.indices(shape).sum(axis=0) * 3
    levels = ((rng.integers(0, 12, shape) + ramp) % 256).astype(np.uint8)  # smooth ramp plus local texture
    footprint = entropy_footprint(spacing_mm, 2.0).numpy().astype(np.uint8)
    reference = skimage_entropy(levels, footprint)  # bits, window clipped at the image border
    fast = information_map(torch.tensor(levels / 255.0)[None], spacing_mm, radius_mm=2.0)
    assert fast.shape == (1, *shape)
    np.testing.assert_allclose(fast[0].numpy(), reference, atol=1e-4)


def test_entropy_of_constant_image_is_zero_and_bounded_by_window():
    assert information_map(torch.full((1, 1, 9, 8), 0.4), (1.0, 1.0), 2.0).abs().max() == 0
    noise = information_map(torch.rand(12, 12, 12), (1.0, 1.0, 1.0), 2.0)
    assert noise.max() <= np.log2(ball(2).sum()) + 1e-5


def test_categories_honour_thresholds():
    info = torch.tensor([0.0, 1.999, 2.0, 4.499, 4.5, 7.0])
    assert info_categories(info).tolist() == [0, 0, 1, 1, 2, 2]
    assert info_categories(info, (1.0, 5.0)).tolist() == [0, 1, 1, 1, 1, 2]


def test_histogram_percentiles_match_numpy_to_one_bin():
    generator = torch.Generator().manual_seed(0)
    values = torch.cat([torch.rand(4000, generator=generator) * 3, torch.rand(1000, generator=generator) * 8])
    counts = torch.histc(values, bins=2048, min=0, max=8)
    low, high = histogram_percentiles(counts, 8.0, (20.0, 80.0))
    width = 8.0 / 2048
    assert low == pytest.approx(np.percentile(values.numpy(), 20), abs=width)
    assert high == pytest.approx(np.percentile(values.numpy(), 80), abs=width)
    assert histogram_percentiles(torch.tensor([0.0, 4.0, 0.0, 0.0]), 4.0, (0.0, 100.0)) == (1.0, 2.0)


@pytest.mark.parametrize("shape", [(5, 6), (3, 4, 2)])
def test_anchors_follow_information_to_the_power_alpha(shape):
    generator = torch.Generator().manual_seed(11)
    info = torch.rand((1, 1, *shape), generator=generator) * 6  # bits
    info.view(-1)[3] = 0.0  # a zero-information voxel is never drawn (0 ** alpha = 0)
    valid = torch.ones_like(info, dtype=torch.bool)
    valid.view(-1)[:2] = False
    n = 40000
    anchors = sample_anchors(info, valid, n, alpha=0.3, generator=generator)
    assert anchors.shape == (1, n, len(shape)) and anchors.dtype == torch.int64
    flat = np.ravel_multi_index(anchors[0].T.numpy(), shape)
    counts = np.bincount(flat, minlength=info.numel())
    expected_weight = (info.flatten().double().numpy() ** 0.3) * valid.flatten().numpy()
    assert counts[~valid.flatten().numpy()].sum() == 0 and counts[3] == 0
    keep = expected_weight > 0
    expected = expected_weight[keep] / expected_weight[keep].sum() * n
    assert chisquare(counts[keep], expected).pvalue > 1e-3


def test_anchors_by_category_ratios_and_uniform_fallback():
    info = torch.tensor([[[1.0, 3.0, 5.0, 3.0]]])  # low, medium, high, medium
    anchors = sample_anchors(info[:, :, None].expand(1, 1, 2, 4), None, 4000, category_ratios=(0.0, 1.0, 3.0),
                             generator=torch.Generator().manual_seed(0))
    columns = np.bincount(anchors[0, :, 1].numpy(), minlength=4)
    assert columns[0] == 0
    assert columns[2] / 4000 == pytest.approx(0.6, abs=0.04)  # 3 / (1 + 3 + 1)
    flat = torch.zeros(2, 1, 3, 3)  # no information anywhere: uniform over valid voxels
    valid = torch.zeros_like(flat, dtype=torch.bool)
    valid[0, 0, 1, 1] = True
    anchors = sample_anchors(flat, valid, 50, generator=torch.Generator().manual_seed(0))
    assert (anchors[0] == torch.tensor([1, 1])).all()
    assert len({tuple(a) for a in anchors[1].tolist()}) > 1  # no valid voxel at all: every voxel allowed


@pytest.mark.parametrize("shape", [(24, 20), (12, 10, 6)])
def test_information_png_is_written(tmp_path, shape):
    image = torch.rand(shape)
    info = information_map(image, (1.0,) * len(shape), 2.0)
    path = save_information_png(image[None], info[None], tmp_path / "sub" / "info.png")
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size[0] > png.size[1] > 100
