"""Config: YAML -> frozen dataclasses, dotted overrides, unknown keys rejected with a hint."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from medssl.config import apply_overrides, from_dict, load_config, parse_override, save_config, to_dict
from medssl.errors import InputError


@dataclass(frozen=True)
class Train:
    steps: int = 10
    lr: float = 1e-3
    optimizer: Literal["adamw", "sgd"] = "adamw"


@dataclass(frozen=True)
class Config:
    method: str | list[str] = "pgssl"
    spatial_dims: int = 2
    train: Train = field(default_factory=Train)
    patch_size: tuple[int, ...] = (64, 64)
    objective: dict[str, dict] = field(default_factory=dict)


def test_parse_override_values_are_yaml():
    assert parse_override("train.steps=200") == (["train", "steps"], 200)
    assert parse_override("data.patch_size=[96,96]") == (["data", "patch_size"], [96, 96])
    assert parse_override("method=msf") == (["method"], "msf")
    with pytest.raises(InputError, match="key.sub=value"):
        parse_override("train.steps")


def test_overrides_build_nested_sections_and_types():
    data = apply_overrides({"train": {"steps": 5}}, ["train.lr=0.5", "patch_size=[32,48]", "objective.msf.k=3"])
    cfg = from_dict(Config, data)
    assert cfg.train == Train(steps=5, lr=0.5)
    assert cfg.patch_size == (32, 48)
    assert cfg.objective == {"msf": {"k": 3}}
    assert to_dict(cfg)["patch_size"] == [32, 48]


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(InputError, match="unknown config key 'train.stpes'.*did you mean 'steps'"):
        from_dict(Config, {"train": {"stpes": 3}})


@pytest.mark.parametrize(
    "data, message",
    [
        ({"spatial_dims": "two"}, "must be an integer"),
        ({"train": {"lr": "fast"}}, "must be a number"),
        ({"train": {"optimizer": "adam"}}, "must be one of"),
        ({"train": 3}, "must be a mapping"),
    ],
)
def test_wrong_types_are_rejected(data, message):
    with pytest.raises(InputError, match=message):
        from_dict(Config, data)


def test_load_and_save_round_trip_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"method": ["pgssl", "msf"], "train": {"steps": 3}}))
    cfg = load_config(path, Config, ["train.lr=0.1"])
    assert cfg.method == ["pgssl", "msf"] and cfg.train.lr == 0.1
    save_config(cfg, tmp_path / "out" / "config.yaml")
    assert load_config(tmp_path / "out" / "config.yaml", Config) == cfg
    path.write_text("train: {bogus: 1}\n")
    with pytest.raises(InputError) as err:
        load_config(path, Config)
    assert str(path) in str(err.value)
    with pytest.raises(InputError, match="not found"):
        load_config(tmp_path / "missing.yaml", Config)


def test_exponent_floats_without_a_dot_are_floats_in_files_and_overrides(tmp_path):
    assert parse_override("train.lr=1e-7") == (["train", "lr"], 1e-7)
    assert parse_override("x=[1e-2, 2E3]")[1] == [0.01, 2000.0]
    assert parse_override("x=e5")[1] == "e5"
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 3e-4\n")
    assert load_config(path, Config).train.lr == pytest.approx(3e-4)


def test_flat_config_and_differences_leave_out_ignored_sections():
    from medssl.config import config_differences, flat_config

    data = {"path": "a", "patch_size": [32, 32]}
    first = {"train": {"lr": 0.1, "device": "cpu"}, "data": data, "validation": {"every": 5}}
    second = {"train": {"lr": 0.2, "device": "cuda"}, "data": data, "validation": {"every": 9}}
    assert flat_config(first, ignore=["validation"]) == {"train.lr": 0.1, "train.device": "cpu", "data.path": "a",
                                                         "data.patch_size": [32, 32]}
    assert config_differences(first, second) == ["train.device", "train.lr", "validation.every"]
    assert config_differences(first, second, ignore=["train.device", "validation"]) == ["train.lr"]


def test_clock_is_hours_minutes_seconds():
    from medssl.engine.monitor import clock

    assert [clock(s) for s in (0.4, 59.6, 3725.0)] == ["0:00:00", "0:01:00", "1:02:05"]


def test_build_section_names_the_config_key_of_a_parameter():
    from medssl.config import build_section

    def build(**options):
        if options.get("alpha", 0) > 1:
            raise InputError("must be in [0, 1], got 2", path="alpha")
        if options.get("both"):
            raise InputError("needs a >= 1 and b >= 1")
        if options.get("file"):
            raise InputError("cannot read", path="data/scan.nii.gz")
        return options

    assert build_section("objective.lewel", lambda: build(alpha=0.5)) == {"alpha": 0.5}
    with pytest.raises(InputError, match=r"^config key 'objective.lewel.alpha': must be in \[0, 1\], got 2$"):
        build_section("objective.lewel", lambda: build(alpha=2))
    with pytest.raises(InputError, match=r"^config section 'objective.pgssl': needs a >= 1 and b >= 1$"):
        build_section("objective.pgssl", lambda: build(both=True))
    with pytest.raises(InputError, match=r"^data/scan.nii.gz: cannot read$"):
        build_section("data", lambda: build(file=True))
