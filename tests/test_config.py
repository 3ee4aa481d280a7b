"""Typed defaults, strict overrides, and the shipped YAML files."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from reid_ssl.config import (
    BYOL_AUGMENT,
    Config,
    ConfigError,
    from_dict,
    load_config,
    parse_overrides,
    to_dict,
    validate,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_are_valid_and_round_trip():
    cfg = load_config()
    assert cfg == Config()
    assert from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert from_dict(to_dict(cfg)) == cfg


def test_paper_configs_carry_the_reference_hyperparameters():
    cfg = load_config(CONFIGS / "imagenet_r50_paper.yaml")
    assert (cfg.model.backbone, cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay) == ("resnet50", "lars", 4.8, 1e-6)
    assert (cfg.loss.k_lo, cfg.loss.k_hi, cfg.loss.gamma, cfg.loss.margin) == (2, 10, 2.0, 100.0)
    assert (cfg.train.batch_size, cfg.train.accumulate, cfg.optim.ema_start) == (196, 4, 0.99)
    assert cfg.model.multires_online == (96, 224) and cfg.model.multires_target == (128, 224)
    sysu = load_config(CONFIGS / "sysu30k_r50_paper.yaml")
    assert sysu.model.init.endswith("imagenet_r50_paper/checkpoint.pt")
    assert (sysu.train.epochs, sysu.optim.warmup_epochs, sysu.train.accumulate) == (10, 2, 8)
    assert (sysu.data.eval_height, sysu.data.eval_width) == (256, 128)


def test_the_cpu_default_file_restates_the_builtin_defaults():
    assert load_config(CONFIGS / "pets09_r18_cpu.yaml") == Config()  # every section, every key


def test_the_cpu_default_is_the_recipe_chosen_on_the_validation_split():
    cfg = Config()  # benchmarks/bench_recipe.py: candidate k-auto-1res-25ep-bag-reid-aug, 96x48 test size
    assert (cfg.loss.k, cfg.model.multires, cfg.train.epochs, cfg.data.positives) == ("auto", False, 25, "auto")
    aug = cfg.augment  # BYOL's views with the colour kept and crops of at least 30%
    assert (aug.crop_scale, aug.hue, aug.saturation, aug.grayscale) == ((0.3, 1.0), 0.0, 0.0, 0.0)
    assert dataclasses.replace(aug, crop_scale=(0.08, 1.0), hue=0.1, saturation=0.2, grayscale=0.2) == BYOL_AUGMENT
    assert (cfg.data.height, cfg.data.width, cfg.data.eval_height, cfg.data.eval_width) == (64, 32, 96, 48)
    for paper in ("imagenet_r50_paper.yaml", "sysu30k_r50_paper.yaml"):
        loss = load_config(CONFIGS / paper).loss
        assert (loss.k, loss.k_lo, loss.k_hi) == ("fixed", 2, 10)  # the paper's window, not the rule
        assert load_config(CONFIGS / paper).augment == BYOL_AUGMENT  # and the paper's views
        assert load_config(CONFIGS / paper).data.positives == "augment"  # of one image


def test_unknown_key_lists_valid_keys(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.learning_rate'.*lr"):
        load_config(f)
    with pytest.raises(ConfigError, match="unknown config key 'optimizer'"):
        load_config(overrides=["optimizer.lr=0.1"])


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.epochs=three", "expects an integer"),
        ("train.epochs=1.5", "expects an integer"),
        ("optim.lr=fast", "expects a finite number"),
        ("model.multires=maybe", "true/false"),
        ("model.multires_online=[1, 2, 3]", "list of 2"),
        ("loss.name=triplet", "not one of"),
        ("loss.k_lo=11", "k_lo <= k_hi"),
        ("loss.k=fixed;train.batch_size=8", "fewer than loss.k_hi"),  # (k=auto shifts the window down)
        ("model.target=shared", "only makes sense"),
        ("train.epochs", "section.key=value"),
        ("epochs=3", "section.key"),
        # every float is finite: inf used to train on and write NaN weights and "lr": NaN
        ("optim.lr=inf", "expects a finite number"),
        ("optim.lr=.inf", "expects a finite number"),
        ("optim.lr=nan", "expects a finite number"),
        ("loss.margin=-inf", "expects a finite number"),
        ("augment.crop_ratio=[0.5, .inf]", "expects a finite number"),
        ("optim.warmup_epochs=inf", "expects a finite number"),
        # and in range
        ("augment.flip=1.5", "are probabilities in"),
        ("augment.hue=0.9", "and augment.hue in"),
        ("augment.crop_ratio=[2, 1]", "crop_ratio"),
        ("optim.momentum=1.5", "optim.momentum"),
        ("optim.warmup_start_factor=0", "warmup_start_factor"),
        ("loss.margin=-1", "loss.margin"),
    ],
)
def test_bad_values_are_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=override.split(";"))


def test_overrides_apply_after_the_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 0.1\ntrain:\n  epochs: 3\n")
    cfg = load_config(f, ["optim.lr=0.2", "model.multires_online=[64, 224]", "model.multires=false"])
    assert cfg.optim.lr == 0.2 and cfg.train.epochs == 3
    assert cfg.model.multires_online == (64, 224) and cfg.model.multires is False


def test_parse_overrides_nests_and_parses_yaml_scalars():
    assert parse_overrides(["a.b=1", "a.c=x", "d.e=true"]) == {"a": {"b": 1, "c": "x"}, "d": {"e": True}}


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    notmap = tmp_path / "list.yaml"
    notmap.write_text("optim: 3\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(notmap)


@pytest.mark.parametrize(
    "text,message",
    [
        ("optim:\n  learning_rate: 0.1\n", "unknown config key 'optim.learning_rate'"),
        ("train:\n  epochs: three\n", "train.epochs expects an integer"),
        ("optim: 3\n", "must be a mapping"),
        ("train:\n  epochs: 3\n  epochs: 5\n", r"key 'epochs' appears twice \(first on line 2\).*line 3"),
        ("train:\n  epochs: 3\ntrain:\n  seed: 1\n", "key 'train' appears twice"),
    ],
)
def test_errors_in_a_config_file_name_the_file(tmp_path, text, message):
    """A YAML file's key and value errors name the file; a key given twice is an error, not "the last wins"."""
    f = tmp_path / "mine.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        load_config(f)
    assert str(f) in str(err.value)


def test_a_config_file_that_is_not_utf8_is_a_clear_error(tmp_path):
    f = tmp_path / "latin1.yaml"
    f.write_bytes("train:\n  out_dir: r\xe9sultats\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"not a UTF-8 text file.*save it as UTF-8"):
        load_config(f)


def test_a_config_built_in_code_with_a_non_finite_number_is_refused():
    cfg = Config()
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=math.inf))
    with pytest.raises(ConfigError, match=r"optim.lr=inf: expects a finite number"):
        validate(cfg)
