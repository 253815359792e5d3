"""``look_up`` (the one "unknown X; choose one of" lookup, with "did you mean") and the ``Registry`` built on it."""

from __future__ import annotations

from pathlib import Path

import pytest

from medssl.errors import InputError
from medssl.registry import Registry, look_up

NORMS = {"instance": "InstanceNorm", "batch": "BatchNorm"}


def test_a_known_value_is_returned():
    assert look_up("cpu", ("auto", "cpu", "cuda"), what="device") == "cpu"
    assert look_up(3, [2, 3], what="dimension") == 3


def test_a_mapping_returns_the_mapped_value():
    assert look_up("batch", NORMS, what="norm") == "BatchNorm"


def test_a_near_miss_suggests_the_closest_choice_and_lists_all():
    with pytest.raises(InputError) as error:
        look_up("instnce", NORMS, what="network norm")
    assert str(error.value) == ("unknown network norm 'instnce' (did you mean 'instance'?); "
                                "choose one of: instance, batch")
    assert error.value.path is None


def test_a_far_miss_lists_the_choices_without_a_guess():
    with pytest.raises(InputError) as error:
        look_up("layer", NORMS, what="network norm")
    assert str(error.value) == "unknown network norm 'layer'; choose one of: instance, batch"


def test_the_path_is_named_first():
    with pytest.raises(InputError) as error:
        look_up("gpu", ("auto", "cpu", "cuda"), what="device", path="--device")
    assert error.value.path == Path("--device")
    assert str(error.value).startswith("--device: unknown device 'gpu'")
    assert str(error.value).endswith("; choose one of: auto, cpu, cuda")


def test_unhashable_and_non_string_values_are_unknown_not_a_crash():
    with pytest.raises(InputError, match=r"unknown norm '\[1, 2\]'; choose one of: instance, batch"):
        look_up([1, 2], NORMS, what="norm")
    with pytest.raises(InputError, match="unknown dimension '4'; choose one of: 2, 3"):
        look_up(4, (2, 3), what="dimension")


def test_registry_get_uses_look_up():
    things: Registry[int] = Registry("method")
    things.register("pgssl")(1)
    things.register("infoguided")(2)
    assert things.get("pgssl") == 1
    with pytest.raises(InputError) as error:
        things.get("infoguidd")
    assert str(error.value) == ("unknown method 'infoguidd' (did you mean 'infoguided'?); "
                                "choose one of: infoguided, pgssl")
    with pytest.raises(KeyError, match="registered twice"):
        things.register("pgssl")(3)
