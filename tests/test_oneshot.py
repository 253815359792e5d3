"""One-shot embedding matching: template == query gives the template landmarks back (sub-pixel), a known shift gives
the known shift, 2D and 3D, anisotropic spacing; template ranking; figures; the file-level entry points."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.networks.layers import Conv, Pool
from scipy.ndimage import gaussian_filter
from torch import nn

from medssl.data.geometry import voxel_to_world
from medssl.data.landmarks import read_landmarks, read_scores, write_landmarks
from medssl.data.readers import load_image, save_image
from medssl.errors import InputError
from medssl.matching.figures import save_landmark_figure
from medssl.correspondence import peak_positions
from medssl.matching import oneshot
from medssl.matching.oneshot import OneShotMatcher, candidate_peaks, prepare_image, support_points
from medssl.matching.run import detect_landmarks_files, rank_templates_files
from medssl.matching.selection import rank_templates, salient_points
from medssl.networks import build_network

SPACING = {2: (0.8, 1.2), 3: (0.8, 1.2, 1.5)}
TINY_CHANNELS = (6, 8, 12, 8)  # depth 2: strides 4, 2, 1; divisor 4


def texture(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Smooth random texture in [0, 1]: every point is distinct, so matching has one answer."""
    values = gaussian_filter(np.random.default_rng(seed).normal(size=shape), 1.5)
    return (values - values.min()) / (values.max() - values.min())


def affine_for(dims: int, origin_mm: tuple[float, ...] | None = None) -> torch.Tensor:
    affine = torch.diag(torch.tensor([*SPACING[dims], 1.0], dtype=torch.float64))
    affine[:dims, dims] = torch.tensor(origin_mm if origin_mm is not None else [3.0, -7.0, 11.0][:dims])
    return affine


def as_image(array: np.ndarray, affine: torch.Tensor) -> MetaTensor:
    return MetaTensor(torch.as_tensor(array, dtype=torch.float32)[None], affine=affine)


class PatchNetwork(nn.Module):
    """Stand-in with the U-Net feature contract (``forward_features`` coarse -> fine, ``min_size_divisor``): the
    zero-mean 5^D patch around each voxel (so cosine = Pearson correlation of patches), average-pooled to strides
    4 and 2. Local and exactly shift-equivariant for shifts by multiples of 4, unlike a random U-Net whose zero
    padding makes its features encode the distance to the border."""

    min_size_divisor = 4

    def __init__(self, spatial_dims: int, kernel_size: int = 5):
        super().__init__()
        count = kernel_size**spatial_dims
        self.conv = Conv["conv", spatial_dims](1, count, kernel_size=kernel_size, padding=kernel_size // 2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_((torch.eye(count) - 1.0 / count).reshape(count, 1, *[kernel_size] * spatial_dims))
        self.pool = Pool["avg", spatial_dims]

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        fine = self.conv(x)  # (B, K^D, *S)
        return [self.pool(kernel_size=4)(fine), self.pool(kernel_size=2)(fine), fine]


def tiny_matcher(dims: int, unet: bool = False, **kwargs) -> OneShotMatcher:
    torch.manual_seed(0)
    network = build_network(spatial_dims=dims, channels=TINY_CHANNELS) if unet else PatchNetwork(dims)
    return OneShotMatcher(network, **kwargs)


SHAPES = {2: (58, 50), 3: (28, 24, 20)}  # 2D not a multiple of the divisor (4): exercises the padding
LANDMARK_VOXELS = {2: [[20.3, 30.6], [41.0, 12.75]], 3: [[10.4, 12.6, 8.2], [17.0, 9.5, 11.7]]}


@pytest.mark.parametrize("combine, unet, consistency", [("product", True, None), ("mean", False, "none"),
                                                         ("product", False, "thin-plate"), ("product", False, "dense")])
@pytest.mark.parametrize("dims", [2, 3])
def test_template_equals_query_returns_template_landmarks(dims, combine, unet, consistency):
    matcher = tiny_matcher(dims, unet=unet, combine=combine, consistency=consistency)
    image = as_image(texture(SHAPES[dims]), affine_for(dims))
    embedding = matcher.embed(image)
    points_mm = voxel_to_world(image.affine.numpy(), np.array(LANDMARK_VOXELS[dims]))
    found = matcher.match([matcher.reference(embedding, image, points_mm)], embedding)
    assert np.abs(found.points_mm - points_mm).max() < 0.1 * max(SPACING[dims])  # well below one voxel
    assert np.all(found.scores > 0.99)
    if consistency == "none":
        assert np.isnan(found.residual_mm).all()
    else:
        assert np.all(found.residual_mm < 0.1 * max(SPACING[dims]))


@pytest.mark.parametrize("dims", [2, 3])
def test_coarse_to_fine_search_keeps_the_combined_maps_in_a_window(dims):
    """The finest search is the every-level combined map, cut (-inf) to a window around the coarser answer."""
    matcher = tiny_matcher(dims, unet=True, search="coarse-to-fine", consistency="none")
    image = as_image(texture(SHAPES[dims]), affine_for(dims))
    embedding = matcher.embed(image)
    points_mm = voxel_to_world(image.affine.numpy(), np.array(LANDMARK_VOXELS[dims]))
    vectors = matcher.reference(embedding, image, points_mm).landmark_vectors
    window = matcher._searched_maps(embedding, [vectors])
    inside = torch.isfinite(window)
    assert inside.any() and (~inside).any()
    assert torch.equal(window[inside], matcher.similarity(embedding, vectors)[inside])
    assert inside.flatten(1).sum(1).max() < 0.5 * inside[0].numel()  # a window, not the image


@pytest.mark.parametrize("dims", [2, 3])
def test_known_content_shift_returns_known_shift(dims):
    """The query shows the texture moved by a whole number of coarsest cells: landmarks move by exactly that."""
    shift = np.array([8, 4, 4][:dims])
    big = texture(tuple(s + 8 for s in SHAPES[dims]), seed=1)
    template = as_image(big[tuple(slice(0, s) for s in SHAPES[dims])], affine_for(dims))
    query = as_image(big[tuple(slice(k, k + s) for k, s in zip(shift, SHAPES[dims]))], affine_for(dims))
    # the own matches' precision: a fifth (2D) to a half (3D) of this toy template lies outside the query, where
    # the support matches and the dense samples find nothing true (in 3D thin-plate 2.1 mm off, dense 1.4 mm)
    matcher = tiny_matcher(dims, consistency="outliers")
    template_voxels = np.round(LANDMARK_VOXELS[dims]) + np.array([6, 4, 2][:dims])  # on the grid: cosine 1 there
    points_mm = voxel_to_world(template.affine.numpy(), template_voxels)
    reference = matcher.reference(matcher.embed(template), template, points_mm)
    predicted_mm = matcher.match([reference], matcher.embed(query)).points_mm
    expected_mm = voxel_to_world(query.affine.numpy(), template_voxels - shift)  # content at t sits at t - shift
    assert np.abs(predicted_mm - expected_mm).max() < 0.5 * max(SPACING[dims])


def test_world_shift_sliding_window_and_ensemble():
    """A query that is the template moved in the world (origin + d mm) gives landmarks + d, also when both are
    embedded in small sliding windows and with two templates (the second a world-shifted copy)."""
    dims = 2
    matcher = tiny_matcher(dims, roi_size=32)  # 58 x 50 image -> several windows of 32 x 32
    array = texture(SHAPES[dims], seed=2)
    template = as_image(array, affine_for(dims))
    moved_mm = np.array([5.5, -3.25])
    query = as_image(array, affine_for(dims, tuple(np.array([3.0, -7.0]) + moved_mm)))
    other = as_image(array, affine_for(dims, (0.0, 0.0)))
    points_mm = voxel_to_world(template.affine.numpy(), np.round(LANDMARK_VOXELS[dims]))
    other_points_mm = points_mm - np.array([3.0, -7.0])
    query_embedding = matcher.embed(query)
    assert [tuple(f.shape[1:]) for f in query_embedding.features] == [(15, 13), (30, 26), (60, 52)]  # padded to 60 x 52
    templates = [matcher.reference(matcher.embed(template), template, points_mm),
                 matcher.reference(matcher.embed(other), other, other_points_mm)]
    predicted_mm = matcher.match(templates, query_embedding).points_mm
    assert np.abs(predicted_mm - (points_mm + moved_mm)).max() < 0.1


@pytest.mark.parametrize("dims", [2, 3])
def test_one_window_embedding_equals_the_sliding_window(dims):
    """An image one window covers is embedded by the network directly, with the features MONAI's sliding window
    (one gaussian-weighted window, every level) gives."""
    from monai.inferers import SlidingWindowInferer

    matcher = tiny_matcher(dims, unet=True)
    image = as_image(texture(SHAPES[dims], seed=4), affine_for(dims))
    embedding = matcher.embed(image)
    assert matcher._windows(embedding.padded_shape) is None
    padded = torch.zeros(1, 1, *embedding.padded_shape)
    padded[(slice(None), slice(None), *[slice(0, s) for s in SHAPES[dims]])] = image.as_tensor()
    inferer = SlidingWindowInferer(roi_size=list(embedding.padded_shape), sw_batch_size=1, overlap=0.5,
                                   mode="gaussian")
    with torch.no_grad():
        windowed = inferer(padded, lambda x: tuple(reversed(matcher.network.forward_features(x))))[::-1]
    assert len(windowed) == len(embedding.features)
    for direct, level in zip(embedding.features, windowed):
        assert torch.allclose(direct, torch.nn.functional.normalize(level[0], dim=0), atol=1e-5)


@pytest.mark.parametrize("dims", [2, 3])
def test_bf16_embedding_stays_close_to_float32(dims):
    """``amp="bf16"`` runs the network in bfloat16 and hands back float32 unit features close to float32's; an
    unknown precision is refused naming --amp."""
    image = as_image(texture(SHAPES[dims], seed=5), affine_for(dims))
    plain = tiny_matcher(dims, unet=True).embed(image)
    half = tiny_matcher(dims, unet=True, amp="bf16").embed(image)
    for exact, approximate in zip(plain.features, half.features):
        assert approximate.dtype == torch.float32 and not torch.equal(exact, approximate)  # it ran in bfloat16
        cosine = (exact * approximate).sum(dim=0)  # per voxel (a tiny random network: a few voxels of small norm)
        assert float(cosine.mean()) > 0.995 and float(cosine.min()) > 0.9
    with pytest.raises(InputError, match="--amp"):
        tiny_matcher(dims, amp="fp8")


LOOK_ALIKE = {2: ((72, 72), (18, 18), (52, 50)), 3: ((36, 36, 36), (10, 10, 10), (26, 25, 26))}  # shape, true, copy


@pytest.mark.parametrize("dims", [2, 3])
def test_consistency_stops_a_jump_to_a_planted_look_alike(dims):
    """The query is the template with the patch around landmark 0 copied far away and its true place disturbed: the
    plain arg-max jumps to a look-alike, the spline through the support matches stays at the true place and says so
    (residual_mm = the jump); 'outliers' replaces only the landmarks that jumped; 'dense' (the spline refined by a
    feature registration) stays at the true places too."""
    shape, true, copy = LOOK_ALIKE[dims]
    array = texture(shape, seed=3)
    query_array = array.copy()
    half = 6
    source = tuple(slice(t - half, t + half + 1) for t in true)
    target = tuple(slice(c - half, c + half + 1) for c in copy)
    query_array[target] = array[source]
    noise = np.random.default_rng(4).normal(scale=0.15, size=query_array[source].shape)
    query_array[source] = np.clip(query_array[source] + noise, 0.0, 1.0)
    template, query = as_image(array, affine_for(dims)), as_image(query_array, affine_for(dims))
    others = {2: [[36, 60], [60, 14]], 3: [[18, 28, 18], [28, 12, 28]]}[dims]  # away from both places
    voxels = np.array([list(true), *others], dtype=float)
    points_mm = voxel_to_world(template.affine.numpy(), voxels)
    results = {}
    for mode in ("none", "thin-plate", "outliers", "dense"):
        matcher = tiny_matcher(dims, consistency=mode)
        found = matcher.match([matcher.reference(matcher.embed(template), template, points_mm)], matcher.embed(query))
        results[mode] = found
    errors = {mode: np.linalg.norm(found.points_mm - points_mm, axis=1) for mode, found in results.items()}
    assert errors["none"][0] > 20.0  # the plain arg-max took a look-alike (the copy, or worse)
    for mode in ("thin-plate", "outliers", "dense"):
        assert errors[mode].max() < max(SPACING[dims]), mode  # every landmark within a voxel of the truth
        # ... and each says how far its own match had jumped
        np.testing.assert_allclose(results[mode].residual_mm, errors["none"], atol=max(SPACING[dims]))
    jumped = errors["none"] > 1.0
    np.testing.assert_allclose(results["outliers"].points_mm[~jumped], results["none"].points_mm[~jumped])


def _every_level_upsampled(matcher: OneShotMatcher, query, vectors) -> list[torch.Tensor]:
    """The definition: each level's cosine map (clamped to [0, 1] in product mode) upsampled to the padded grid."""
    maps = []
    for level, vector in zip(query.features, vectors):
        cosine = torch.einsum("lc,c...->l...", vector, level)
        cosine = cosine.clamp(0.0, 1.0) if matcher.combine == "product" else cosine
        maps.append(torch.nn.functional.interpolate(cosine[None], size=list(query.padded_shape),
                                                    mode="bilinear" if query.spatial_dims == 2 else "trilinear",
                                                    align_corners=False)[0])
    return maps


@pytest.mark.parametrize("combine", ["product", "mean"])
@pytest.mark.parametrize("dims", [2, 3])
def test_combined_maps_equal_the_per_level_definition(dims, combine):
    """The in-place combination equals ``combine_levels`` of every level upsampled (the definition); on every
    second voxel it equals the definition evaluated on the finer levels' features sampled there."""
    matcher = tiny_matcher(dims, unet=True, combine=combine)
    image = as_image(texture(SHAPES[dims]), affine_for(dims))
    embedding = matcher.embed(image)
    points = voxel_to_world(image.affine.numpy(), np.array(LANDMARK_VOXELS[dims]))
    vectors = matcher.template_vectors(embedding, points)
    reference = matcher.combine_levels(_every_level_upsampled(matcher, embedding, vectors))
    assert torch.allclose(matcher.combined_maps(embedding, vectors), reference, atol=1e-5)
    coarse = matcher.combined_maps(embedding, vectors, stride=2)  # every second voxel
    half = [s // 2 for s in embedding.padded_shape]
    sampled = [level if level.shape[1] <= half[0] else torch.nn.functional.normalize(torch.nn.functional.interpolate(
        level[None], size=half, mode="bilinear" if dims == 2 else "trilinear", align_corners=False)[0], dim=0)
        for level in embedding.features]
    on_half = replace(embedding, features=sampled, padded_shape=tuple(half))
    assert torch.allclose(coarse, matcher.combine_levels(_every_level_upsampled(matcher, on_half, vectors)), atol=1e-5)


@pytest.mark.parametrize("dims", [2, 3])
def test_candidate_peaks_equal_a_full_max_pool(dims, monkeypatch):
    generator = torch.Generator().manual_seed(dims)
    maps = torch.rand(6, *[12] * dims, generator=generator)
    maps = torch.nn.functional.avg_pool3d(maps[:, None], 3, 1, 1)[:, 0] if dims == 3 else \
        torch.nn.functional.avg_pool2d(maps[:, None], 3, 1, 1)[:, 0]  # smooth: a few local maxima each
    maps[0] = -torch.inf  # a search window holding two voxels
    maps[(0,) + (3,) * dims] = 0.5
    maps[(0,) + (4,) * dims] = 0.4
    maps[1] = torch.linspace(0, 1, maps[1].numel()).reshape(maps[1].shape)  # one maximum: the rest repeat it
    rough = torch.rand(2, *[12] * dims, generator=generator)  # hundreds of maxima: the top voxels suffice
    pooled = oneshot._pooled_peaks
    assert torch.equal(candidate_peaks(maps, 4), pooled(maps, 4))
    assert (candidate_peaks(maps, 4)[1] == candidate_peaks(maps, 4)[1, :1]).all()
    monkeypatch.setattr(oneshot, "_pooled_peaks", None)  # found among the top voxels, no full pool
    assert torch.equal(candidate_peaks(rough, 4), pooled(rough, 4))


def test_support_points_cover_the_foreground_evenly():
    array = np.zeros((80, 60))
    array[10:70, 15:45] = 1.0  # 60 x 30 voxels of 1 x 1.5 mm foreground: 2700 mm^2
    image = as_image(array, torch.diag(torch.tensor([1.0, 1.5, 1.0], dtype=torch.float64)))
    points = support_points(image, count=50)
    assert 35 <= len(points) <= 70
    assert np.all(array[tuple(points.astype(int).T)] == 1.0)
    steps = [np.diff(np.unique(points[:, axis])) for axis in range(2)]
    assert abs(steps[0][0] * 1.0 - steps[1][0] * 1.5) <= 1.5  # about the same step in mm along both axes


def test_levels_select_feature_levels_and_are_checked():
    image = as_image(texture(SHAPES[2], seed=2), affine_for(2))
    full = tiny_matcher(2, unet=True).embed(image).features  # depth 2: bottleneck + 2 decoder levels
    chosen = tiny_matcher(2, unet=True, levels=[2, 0]).embed(image).features
    assert len(full) == 3 and [c.shape for c in chosen] == [full[2].shape, full[0].shape]
    assert torch.equal(chosen[0], full[2]) and torch.equal(chosen[1], full[0])
    for levels, message in [([3], r"level\(s\) 3 out of range"), ([], "whole level indices"),
                            ([0.5], "whole level indices")]:
        with pytest.raises(InputError, match=message):
            tiny_matcher(2, unet=True, levels=levels)


@pytest.mark.parametrize("dims", [2, 3])
def test_peak_positions_recovers_parabola_vertex(dims):
    shape = (20, 17, 15)[:dims]
    vertices = np.array([[7.3, 9.8, 4.6], [12.0, 3.45, 10.2]])[:, :dims]
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1)  # (*S, D)
    maps = torch.stack([torch.as_tensor(5.0 - ((grid - v) ** 2).sum(-1)) for v in vertices])  # (2, *S)
    voxels, scores = peak_positions(maps)
    np.testing.assert_allclose(voxels, vertices, atol=1e-9)  # a parabola fit is exact on a parabola
    np.testing.assert_allclose(scores, [maps[i].max().item() for i in range(2)])
    integer, _ = peak_positions(maps, subpixel=False)
    np.testing.assert_array_equal(integer, np.round(vertices))


def test_salient_points_finds_square_corners():
    image = np.zeros((64, 64))
    image[20:44, 16:40] = 1.0
    points = salient_points(as_image(image, torch.eye(3, dtype=torch.float64)), n_points=4, min_distance_mm=8,
                            sigma_mm=1.0)
    corners = np.array([[19.5, 15.5], [19.5, 39.5], [43.5, 15.5], [43.5, 39.5]])
    distances = np.linalg.norm(points[:, None] - corners[None], axis=-1)  # (K, 4)
    assert len(points) == 4 and distances.min(axis=0).max() <= 2.0


def test_rank_templates_puts_the_outlier_last():
    dims, shape = 2, (48, 48)
    base = texture(shape, seed=3)
    rng = np.random.default_rng(4)
    pool = [base + 0.02 * rng.normal(size=shape), base + 0.02 * rng.normal(size=shape), texture(shape, seed=9)]
    images = [as_image(a, affine_for(dims)) for a in pool]
    scores = rank_templates(tiny_matcher(dims), images, n_points=6, min_distance_mm=4.0)
    assert scores.shape == (3,) and np.argmin(scores) == 2


@pytest.mark.parametrize("dims", [2, 3])
def test_landmark_figure_is_written(tmp_path, dims):
    import matplotlib.image

    image = as_image(texture(SHAPES[dims]), affine_for(dims))
    points = voxel_to_world(image.affine.numpy(), np.array(LANDMARK_VOXELS[dims]))
    predicted = {"a": points[0], "b": points[1]}
    path = save_landmark_figure(tmp_path / "f.png", image, predicted, truth={"a": points[0] + 1.0}, title="t")
    assert matplotlib.image.imread(path).shape[1] == (320 if dims == 2 else 640)  # one panel, or one per landmark


# ----------------------------------------------------------------------------------------------- files
def write_case(folder: Path, dims: int) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """Template image + landmark CSV on disk (PNG for 2D at 1 mm, NIfTI for 3D with anisotropic spacing)."""
    if dims == 2:
        array, affine = (texture((64, 56), seed=5) * 255).astype(np.uint8), torch.eye(3, dtype=torch.float64)
        path = save_image(array, affine, folder / "images" / "case_a.png")
    else:
        array, affine = texture((24, 20, 16), seed=5).astype(np.float32), affine_for(3)
        path = save_image(array, affine, folder / "images" / "case_a.nii.gz")
    landmarks = {"p": voxel_to_world(affine.numpy(), np.array(LANDMARK_VOXELS[dims][0]) * 0.7),
                 "q": voxel_to_world(affine.numpy(), np.array(LANDMARK_VOXELS[dims][1]) * 0.7)}
    csv_path = write_landmarks(folder / "template.csv", {"case_a": landmarks})
    return path, csv_path, landmarks


@pytest.mark.parametrize("dims", [2, 3])
def test_detect_landmarks_files_from_a_saved_model(tmp_path, dims):
    from medssl.networks import save_model

    image_path, csv_path, landmarks = write_case(tmp_path, dims)
    torch.manual_seed(0)
    model = save_model(build_network(spatial_dims=dims, channels=TINY_CHANNELS), tmp_path / "model.pt",
                       spatial_dims=dims, preprocessing={"modality": "mr"})
    out = detect_landmarks_files(model, [image_path], [csv_path], [tmp_path / "images"], tmp_path / "pred.csv",
                                 figure_dir=tmp_path / "figures", truth=csv_path)
    predicted, scores = read_landmarks(out), read_scores(out)
    for name, position in landmarks.items():
        assert np.abs(predicted["case_a"][name] - position).max() < 0.15
        assert scores["case_a"][name] > 0.99
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["case_a.png", "template_case_a.png"]


def test_min_score_leaves_landmarks_out_and_evaluate_counts_them(tmp_path):
    from medssl.networks import save_model
    from medssl.metrics.landmarks import landmark_scores

    image_path, csv_path, landmarks = write_case(tmp_path, 2)
    noisy = np.asarray(load_image(image_path).as_tensor()[0]) + np.random.default_rng(0).normal(scale=20, size=(64, 56))
    query = save_image(np.clip(noisy, 0, 255).astype(np.uint8), torch.eye(3), tmp_path / "queries" / "case_b.png")
    torch.manual_seed(0)
    model = save_model(build_network(spatial_dims=2, channels=TINY_CHANNELS), tmp_path / "model.pt",
                       spatial_dims=2, preprocessing={"modality": "mr"})
    kept = detect_landmarks_files(model, [image_path], [csv_path], [query], tmp_path / "all.csv")
    header = open(kept).readline().strip().split(",")
    assert header == ["image", "name", "x", "y", "score", "residual_mm"]
    scores = read_scores(kept)["case_b"]
    assert len(set(scores.values())) == 2
    threshold = float(np.mean(list(scores.values())))
    out = detect_landmarks_files(model, [image_path], [csv_path], [query], tmp_path / "some.csv", min_score=threshold)
    left = read_landmarks(out)["case_b"]
    assert set(left) == {max(scores, key=scores.get)}
    truth = {"case_b": landmarks}
    assert landmark_scores(read_landmarks(out), truth)["n_missing"] == 1
    with pytest.raises(InputError, match="--min-score"):
        detect_landmarks_files(model, [image_path], [csv_path], [image_path], tmp_path / "x.csv",
                               min_score=float("nan"))


def test_detect_landmarks_files_rejects_bad_input(tmp_path):
    image_path, csv_path, _ = write_case(tmp_path, 2)
    with pytest.raises(InputError, match="did you mean 'ncc'"):
        detect_landmarks_files("none", [image_path], [csv_path], [image_path], tmp_path / "p.csv", method="nc")
    other_csv = write_landmarks(tmp_path / "other.csv", {"x1": {"p": np.zeros(2)}, "x2": {"p": np.zeros(2)}})
    with pytest.raises(InputError, match="no rows for template 'case_a'"):
        detect_landmarks_files("none", [image_path], [other_csv], [image_path], tmp_path / "p.csv")
    outside = write_landmarks(tmp_path / "outside.csv", {"case_a": {"p": np.array([500.0, 2.0])}})
    with pytest.raises(InputError, match="lies outside"):
        detect_landmarks_files("none", [image_path], [outside], [image_path], tmp_path / "p.csv", method="ncc")
    from medssl.networks import save_model

    model_3d = save_model(build_network(spatial_dims=3, channels=TINY_CHANNELS), tmp_path / "m3.pt", spatial_dims=3,
                          preprocessing={})
    with pytest.raises(InputError, match="the checkpoint is 3D but the images are 2D"):
        detect_landmarks_files(model_3d, [image_path], [csv_path], [image_path], tmp_path / "p.csv")


def test_rank_templates_files_writes_a_ranking(tmp_path):
    for seed in range(3):
        save_image((texture((48, 40), seed=seed) * 255).astype(np.uint8), torch.eye(3), tmp_path / "pool" / f"i{seed}.png")
    torch.manual_seed(0)
    from medssl.networks import save_model

    model = save_model(build_network(spatial_dims=2, channels=TINY_CHANNELS), tmp_path / "model.pt", spatial_dims=2,
                       preprocessing={"spacing_mm": 1.5})
    out = rank_templates_files(model, [tmp_path / "pool"], tmp_path / "rank.csv", n_points=4)
    rows = list(csv.DictReader(open(out)))
    assert [r["rank"] for r in rows] == ["1", "2", "3"] and sorted(r["image"] for r in rows) == ["i0", "i1", "i2"]
    assert [float(r["score"]) for r in rows] == sorted((float(r["score"]) for r in rows), reverse=True)


def test_prepare_image_resamples_only_when_the_spacing_differs(tmp_path):
    path = save_image(texture((24, 20, 16)).astype(np.float32), affine_for(3), tmp_path / "a.nii.gz")
    same = prepare_image(path, spatial_dims=3, spacing_mm=SPACING[3])
    assert tuple(same.shape[1:]) == (24, 20, 16)
    coarse = prepare_image(path, spatial_dims=3, spacing_mm=(1.6, 2.4, 3.0))
    np.testing.assert_allclose(np.linalg.norm(coarse.affine[:3, :3].numpy(), axis=0), (1.6, 2.4, 3.0))
    assert tuple(coarse.shape[1:]) == (12, 10, 8) or abs(coarse.shape[1] - 12) <= 1
    isotropic = prepare_image(path, spatial_dims=3, spacing_mm=3.0)  # one value: every axis (what model.pt stores)
    np.testing.assert_allclose(np.linalg.norm(isotropic.affine[:3, :3].numpy(), axis=0), (3.0, 3.0, 3.0))


def test_random_init_baseline_is_fixed_and_leaves_the_callers_rng_alone():
    from medssl.matching.run import matching_network

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = matching_network("none", 2).network
    assert torch.equal(torch.rand(3), expected)
    second = matching_network("none", 2).network
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)


def test_too_few_points_for_a_robust_fit_keep_the_own_matches(caplog):
    matcher = tiny_matcher(2, consistency="none")
    image = as_image(texture(SHAPES[2]), affine_for(2))
    embedding = matcher.embed(image)
    points_mm = voxel_to_world(image.affine.numpy(), np.array(LANDMARK_VOXELS[2]))
    reference = matcher.reference(embedding, image, points_mm)  # 2 landmarks, no support points
    matcher.consistency = "thin-plate"
    found = matcher.match([reference], embedding)
    assert np.abs(found.points_mm - points_mm).max() < 0.1 and np.isnan(found.residual_mm).all()
    assert "a robust fit needs 4" in caplog.text
    with pytest.raises(InputError, match="unknown consistency check 'affine'"):
        tiny_matcher(2, consistency="affine")


def test_dense_reference_holds_its_samples_after_the_support_points():
    image = as_image(texture(SHAPES[2]), affine_for(2))
    points_mm = voxel_to_world(image.affine.numpy(), np.array(LANDMARK_VOXELS[2]))
    matcher = tiny_matcher(2, consistency="dense", samples=50, support=20)
    embedding = matcher.embed(image)
    reference = matcher.reference(embedding, image, points_mm)
    spline_only = tiny_matcher(2, consistency="outliers", support=20).reference(embedding, image, points_mm)
    assert reference.samples == 50 and len(reference.sample_points_mm) == 50
    np.testing.assert_array_equal(reference.spline_points_mm, spline_only.points_mm)  # landmarks, then support
    for dense, spline in zip(reference.support_vectors, spline_only.support_vectors):
        torch.testing.assert_close(dense, spline)
    assert all(len(vector) == 50 for vector in reference.sample_vectors)
    with pytest.raises(InputError, match="dense registration samples"):
        tiny_matcher(2, samples=0)
