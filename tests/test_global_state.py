"""Library code leaves global state alone: figures draw on ``matplotlib.figure.Figure`` objects (no backend
switch, no pyplot figures left open), and a fixed seed for weights does not touch the caller's torch RNG."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medssl.data.demo_figures import save_population_figure
from medssl.rng import global_state_kept, seeded
from medssl.matching.figures import save_landmark_figure
from medssl.report.figures import save_curves_figure, save_segmentation_figure, save_similarity_figure
from medssl.transforms.infomap import save_information_png


@pytest.fixture
def pdf_backend():
    """A backend other than the Agg the old figure code switched to; the caller's backend back afterwards."""
    previous = matplotlib.get_backend()
    matplotlib.use("pdf")
    yield
    matplotlib.use(previous)


def test_figures_keep_the_backend_and_leave_no_pyplot_figures(tmp_path, pdf_backend):
    import matplotlib.pyplot as plt

    image = MetaTensor(torch.rand(1, 16, 16), affine=torch.eye(3, dtype=torch.float64))
    label = MetaTensor((torch.rand(1, 16, 16) * 3).round(), affine=image.affine)
    point = {"a": np.array([4.0, 5.0])}
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("step,loss,val/mean_dice\n1,0.5,0.1\n2,0.4,0.2\n")
    written = [
        save_landmark_figure(tmp_path / "landmarks.png", image, point, truth=point, title="t"),
        save_information_png(image[0], torch.rand(16, 16), tmp_path / "info.png"),
        save_curves_figure(tmp_path / "curves.png", metrics, {"run": metrics}),
        save_similarity_figure(tmp_path / "similarity.png", "a", image, point["a"], image, point["a"],
                               {"run": np.random.rand(16, 16)}, {"run": point["a"]}),
        save_segmentation_figure(tmp_path / "seg.png", image, label, {"run": label}, {1: "one"}),
        save_population_figure(tmp_path / "population.png",
                               {"s": (image[0].numpy(), label[0].numpy(), np.eye(3), point)}),
    ]
    assert all(path.read_bytes().startswith(b"\x89PNG") for path in written)
    assert matplotlib.get_backend() == "pdf"
    assert plt.get_fignums() == []


def test_seeded_fixes_weights_and_keeps_the_callers_rng():
    before = torch.get_rng_state()
    with seeded(3):
        first = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)
    with seeded(3):
        assert torch.equal(torch.rand(4), first)


def test_global_state_kept_restores_generators_and_determinism_flags():
    import random

    torch.manual_seed(11)
    np.random.seed(11)
    random.seed(11)
    expected = torch.rand(3), np.random.rand(3), random.random()
    torch.manual_seed(11)
    np.random.seed(11)
    random.seed(11)
    flags = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    with global_state_kept():
        from monai.utils import set_determinism

        set_determinism(seed=0)
        torch.use_deterministic_algorithms(not flags[0], warn_only=True)
        torch.rand(5), np.random.rand(5), random.random()
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark) == flags
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]
