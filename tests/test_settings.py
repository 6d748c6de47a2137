"""Tests for capcli.settings: shipped defaults, layer precedence, preset profiles and error messages.

Precedence, lowest first (DESIGN §2): field defaults < preset profile < CAPCLI_* env < --config file < CLI.
Every test passes ``environ=`` explicitly, so a developer's own environment cannot leak in.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import SMALL_SIZES

from capcli.errors import ConfigError
from capcli.settings import (
    AlignSettings,
    DecodeSettings,
    EngineSettings,
    Settings,
    config_path,
    deep_merge,
    load_settings,
    read_yaml,
    to_yaml,
    unflatten,
)


def write_config(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- the shipped defaults ---------------------------------------------------------------------------------------


def test_default_yaml_equals_the_settings_defaults():
    shipped = yaml.safe_load(config_path("default.yaml").read_text(encoding="utf-8"))
    assert shipped == Settings().model_dump(mode="json")


def test_defaults_are_the_original_design_values():
    s = Settings()
    assert (s.pretrain.engine.epochs, s.pretrain.engine.batch_size) == (10, 64)
    assert s.pretrain.optimizer.lr == 1e-4
    assert s.model.temperature == 0.07
    assert (s.align.engine.epochs, s.align.engine.batch_size) == (5, 32)
    assert s.align.optimizer.lr == 3e-5
    for engine in (s.pretrain.engine, s.align.engine):
        assert (engine.grad_accum, engine.clip_grad, engine.patience) == (2, 1.0, 3)
    assert (s.data.train_size, s.data.val_size, s.data.test_size) == (10000, 1000, 1000)
    assert s.pretrain.engine.output == Path("runs/pretrain")
    assert s.align.engine.output == Path("runs/align")


@pytest.mark.parametrize(
    ("name", "preset"),
    [("default.yaml", "tiny"), ("ablation.yaml", "tiny"), ("presets/tiny.yaml", "tiny"),
     ("presets/clip-gpt2.yaml", "clip-gpt2")],
)
def test_every_shipped_config_is_strictly_valid(name, preset):
    data = deep_merge(read_yaml(config_path(name)), {"model": {"preset": preset}})
    assert data  # the file is not empty
    Settings.model_validate(deep_merge(Settings().model_dump(), data))


# --- precedence -------------------------------------------------------------------------------------------------

# One key, pretrain.engine.epochs, set at every layer: default 10, tiny profile 16, env 4, file 5, CLI 6.
ENV_EPOCHS = {"CAPCLI_PRETRAIN__ENGINE__EPOCHS": "4"}
FILE_EPOCHS = "pretrain:\n  engine:\n    epochs: 5\n"
CLI_EPOCHS = {"pretrain.engine.epochs": 6}


@pytest.mark.parametrize(
    ("env", "file", "cli", "expected"),
    [
        (True, True, True, 6),
        (True, True, False, 5),
        (True, False, True, 6),
        (False, True, True, 6),
        (True, False, False, 4),
        (False, True, False, 5),
        (False, False, True, 6),
        (False, False, False, 16),  # the tiny preset's profile
    ],
    ids=["all", "env+file", "env+cli", "file+cli", "env-only", "file-only", "cli-only", "profile-only"],
)
def test_precedence_is_cli_then_file_then_env_then_profile(tmp_path, env, file, cli, expected):
    settings = load_settings(
        config=write_config(tmp_path, FILE_EPOCHS) if file else None,
        cli=CLI_EPOCHS if cli else None,
        environ=ENV_EPOCHS if env else {},
    )
    assert settings.pretrain.engine.epochs == expected


def test_plain_defaults_apply_when_no_layer_sets_the_key():
    # clip-gpt2's profile does not touch epochs, so the field default shows through.
    assert load_settings(cli={"model.preset": "clip-gpt2"}, environ={}).pretrain.engine.epochs == 10


def test_layers_setting_different_keys_all_apply(tmp_path):
    settings = load_settings(
        config=write_config(tmp_path, "pretrain:\n  engine:\n    batch_size: 5\n"),
        cli={"pretrain.optimizer.lr": 0.5},
        environ={"CAPCLI_DATA__TRAIN_SIZE": "77"},
    )
    assert settings.pretrain.engine.batch_size == 5
    assert settings.pretrain.optimizer.lr == 0.5
    assert settings.data.train_size == 77
    assert settings.data.val_size == 300  # untouched: the tiny profile's


def test_environment_is_read_from_os_environ_by_default(monkeypatch):
    monkeypatch.setenv("CAPCLI_DATA__TRAIN_SIZE", "9")
    assert load_settings().data.train_size == 9


def test_env_values_are_parsed_to_the_field_types():
    settings = load_settings(environ={
        "CAPCLI_RUNTIME__QUIET": "true",
        "CAPCLI_PRETRAIN__OPTIMIZER__BETAS": "[0.8, 0.9]",
        "capcli_data__val_size": "7",  # names are case-insensitive
    })
    assert settings.runtime.quiet is True
    assert settings.pretrain.optimizer.betas == (0.8, 0.9)
    assert settings.data.val_size == 7


def test_cli_none_means_not_given():
    settings = load_settings(cli={"pretrain.engine.epochs": None, "runtime.device": None}, environ={})
    assert settings.pretrain.engine.epochs == 16
    assert settings.runtime.device == "auto"


# --- preset profiles --------------------------------------------------------------------------------------------


def test_tiny_profile_applies_with_nothing_set():
    s = load_settings(environ={})
    assert s.model.preset == "tiny"
    assert (s.data.train_size, s.data.val_size, s.data.test_size) == (10000, 300, 300)
    assert (s.pretrain.engine.epochs, s.pretrain.engine.max_steps, s.pretrain.engine.batch_size) == (16, 1500, 32)
    assert s.pretrain.optimizer.lr == 1e-3
    assert (s.align.engine.epochs, s.align.engine.max_steps) == (3, 350)
    assert (s.model.prefix_mapper, s.model.concept_source) == ("tokens", "patches")
    assert s.align.optimizer.lr == 1e-4
    assert (s.align.pairs_per_image, s.align.lm_weight) == (5, 0.5)


@pytest.mark.parametrize("layer", ["env", "file", "cli"])
def test_a_user_value_wins_over_the_tiny_profile(tmp_path, layer):
    env = {"CAPCLI_DATA__TRAIN_SIZE": "50"} if layer == "env" else {}
    config = write_config(tmp_path, "data:\n  train_size: 50\n") if layer == "file" else None
    cli = {"data.train_size": 50} if layer == "cli" else None
    s = load_settings(config=config, cli=cli, environ=env)
    assert s.data.train_size == 50
    assert s.data.val_size == 300  # the rest of the profile still applies


def test_clip_gpt2_profile_sets_pretrained_parts():
    s = load_settings(cli={"model.preset": "clip-gpt2"}, environ={})
    assert s.model.vision_weights == "openai"
    assert s.model.decoder == "gpt2"
    assert s.data.train_size == 10000  # the tiny profile is not applied
    assert s.pretrain.engine.batch_size == 64


def test_preset_chosen_in_env_selects_its_profile():
    s = load_settings(environ={"CAPCLI_MODEL__PRESET": "clip-gpt2"})
    assert (s.model.preset, s.model.vision_weights) == ("clip-gpt2", "openai")


def test_a_user_value_wins_over_the_clip_gpt2_profile():
    s = load_settings(cli={"model.preset": "clip-gpt2", "model.vision_weights": "none",
                           "model.decoder": "distilgpt2"}, environ={})
    assert (s.model.vision_weights, s.model.decoder) == ("none", "distilgpt2")


# --- partial groups ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny", "clip-gpt2"])
def test_partial_env_group_keeps_the_groups_other_defaults(preset):
    s = load_settings(environ={"CAPCLI_ALIGN__ENGINE__EPOCHS": "4", "CAPCLI_MODEL__PRESET": preset})
    assert s.align.engine.epochs == 4
    assert EngineSettings().batch_size == 64  # the generic default must not leak into align
    assert s.align.engine.batch_size == 32
    assert s.align.engine.output == Path("runs/align")
    assert s.align.engine.grad_accum == 2
    assert s.align.optimizer.lr == (1e-4 if preset == "tiny" else 3e-5)


def test_partial_file_group_keeps_the_groups_other_defaults(tmp_path):
    config = write_config(tmp_path, "model: {preset: clip-gpt2}\nalign:\n  engine:\n    epochs: 3\n")
    s = load_settings(config=config, environ={})
    assert s.align.engine == AlignSettings().engine.model_copy(update={"epochs": 3})
    assert s.align.optimizer == AlignSettings().optimizer


def test_partial_cli_group_keeps_the_groups_other_defaults():
    s = load_settings(cli={"model.preset": "clip-gpt2", "align.engine.epochs": 3}, environ={})
    assert (s.align.engine.epochs, s.align.engine.batch_size) == (3, 32)
    assert s.align.engine.output == Path("runs/align")


# --- errors -----------------------------------------------------------------------------------------------------


def config_error(**kwargs) -> str:
    """The message of the ConfigError that load_settings raises; it must be one line."""
    with pytest.raises(ConfigError) as caught:
        load_settings(**kwargs)
    message = str(caught.value)
    assert "\n" not in message
    assert caught.value.exit_code == 2
    return message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("pretrain: {engine: {epoch: 3}}", ["unknown setting", "'pretrain.engine.epoch'", "did you mean 'epochs'",
                                            "allowed here:", "batch_size"]),
        ("bogus: 1", ["unknown setting 'bogus'", "align, benchmark, caption, data, evaluate, model, pretrain, runtime"]),
        ('pretrain: {optimizer: {lr: "fast"}}', ["'pretrain.optimizer.lr'", "valid number", "'fast'"]),
        ("pretrain: {engine: {batch_size: 0}}", ["'pretrain.engine.batch_size'", "greater than or equal to 1",
                                                 "got 0"]),
        ("model: {temperature: -1}", ["'model.temperature'", "greater than 0", "got -1"]),
        ("pretrain: {optimizer: {warmup: 2}}", ["'pretrain.optimizer.warmup'", "less than or equal to 1", "got 2"]),
        ("runtime: {device: tpu}", ["'runtime.device'", "'auto', 'cpu', 'cuda' or 'mps'", "'tpu'"]),
        ("model: {preset: huge}", ["'model.preset'", "'tiny' or 'clip-gpt2'", "'huge'"]),
        ("model: {vision_weights: openai}", ["'model'", "tiny preset", "vision_weights", "clip-gpt2"]),
        ("pretrain: {contrastive_weight: 0, caption_weight: 0}", ["'pretrain'", "contrastive_weight",
                                                                  "caption_weight", "cannot both be 0"]),
        ("data: 5", ["'data'", "valid dictionary"]),
    ],
    ids=["unknown-key", "unknown-group", "wrong-type", "batch-size-0", "negative-temperature", "warmup-2",
         "bad-device", "bad-preset", "tiny-with-weights", "no-loss", "group-not-a-mapping"],
)
def test_bad_config_file_names_the_key_and_what_is_allowed(tmp_path, text, expected):
    message = config_error(config=write_config(tmp_path, text), environ={})
    for part in expected:
        assert part in message


def test_missing_config_file_is_named(tmp_path):
    message = config_error(config=tmp_path / "nope.yaml", environ={})
    assert "config file not found" in message
    assert "nope.yaml" in message


def test_invalid_yaml_is_reported_with_the_file(tmp_path):
    message = config_error(config=write_config(tmp_path, "pretrain: [epochs\n", "broken.yaml"), environ={})
    assert "broken.yaml" in message
    assert "not valid YAML" in message


def test_yaml_list_at_top_level_is_refused(tmp_path):
    message = config_error(config=write_config(tmp_path, "- pretrain\n- align\n"), environ={})
    assert "top level must be a mapping" in message
    assert "list" in message


def test_empty_config_file_means_no_settings(tmp_path):
    assert load_settings(config=write_config(tmp_path, ""), environ={}) == load_settings(environ={})


def test_unknown_env_group_is_an_error():
    message = config_error(environ={"CAPCLI_BOGUS": "1"})
    assert "CAPCLI_BOGUS" in message
    assert "align, benchmark, caption, data, evaluate, model, pretrain, runtime" in message


def test_unknown_nested_env_key_is_an_error():
    message = config_error(environ={"CAPCLI_PRETRAIN__ENGINE__EPOCH": "3"})
    assert "'pretrain.engine.epoch'" in message
    assert "did you mean 'epochs'" in message


def test_bad_env_value_names_the_key():
    message = config_error(environ={"CAPCLI_DATA__TRAIN_SIZE": "many"})
    assert "'data.train_size'" in message
    assert "'many'" in message


def test_other_environment_variables_are_ignored():
    assert load_settings(environ={"PATH": "/bin", "CAPCLIX": "1"}) == load_settings(environ={})


def test_bad_cli_value_names_the_key():
    message = config_error(cli={"runtime.device": "tpu"}, environ={})
    assert "'runtime.device'" in message
    assert "'auto', 'cpu', 'cuda' or 'mps'" in message


def test_model_group_given_as_a_string_is_a_config_error(tmp_path):
    message = config_error(config=write_config(tmp_path, "model: tiny\n"), environ={})
    assert "'model'" in message


def test_env_group_without_a_field_is_a_config_error():
    message = config_error(environ={"CAPCLI_DATA": "small"})
    assert "CAPCLI_DATA" in message


# --- shipped ablation, YAML round trip, helpers -----------------------------------------------------------------


def test_ablation_config_keeps_alpha_at_one():
    s = load_settings(config=config_path("ablation.yaml"), environ={})
    assert s.align.alpha_init == 1.0
    assert s.align.alpha_final == 1.0
    assert s.align.engine.output == Path("runs/align-ablation")
    assert s.align.beta == 0.1  # the rest of align stays at its defaults
    assert s.align.engine.epochs == 3  # and the tiny profile still applies


def test_to_yaml_round_trips_through_config(tmp_path, settings_factory):
    settings = settings_factory("run", **{"pretrain.engine.max_steps": 7, "pretrain.optimizer.betas": (0.5, 0.6)})
    path = write_config(tmp_path, to_yaml(settings), "resolved.yaml")
    assert load_settings(config=path, environ={}) == settings


def test_to_yaml_round_trips_a_clip_gpt2_run(tmp_path):
    settings = load_settings(cli={"model.preset": "clip-gpt2", "model.decoder": "distilgpt2",
                                  "data.cache_dir": tmp_path / "cache", **SMALL_SIZES}, environ={})
    path = write_config(tmp_path, to_yaml(settings), "resolved.yaml")
    assert load_settings(config=path, environ={}) == settings
    assert yaml.safe_load(path.read_text(encoding="utf-8"))["data"]["cache_dir"] == str(tmp_path / "cache")


def test_unflatten_nests_dotted_keys_and_drops_none():
    assert unflatten({"a.b.c": 1, "a.d": 2, "e": None}) == {"a": {"b": {"c": 1}, "d": 2}}


def test_deep_merge_merges_mappings_without_mutating_the_base():
    base = {"a": {"b": 1, "c": 2}, "d": 3}
    assert deep_merge(base, {"a": {"c": 9}, "d": {"x": 1}}) == {"a": {"b": 1, "c": 9}, "d": {"x": 1}}
    assert base == {"a": {"b": 1, "c": 2}, "d": 3}


# --- the decoding group: caption's and evaluate's search, one validator -------------------------------------------


@pytest.mark.parametrize(
    ("cli", "expected"),
    [
        ({"caption.decode.beams": 0}, ["'caption.decode.beams'", "greater than or equal to 1", "got 0"]),
        ({"evaluate.decode.max_length": 0}, ["'evaluate.decode.max_length'", "greater than or equal to 1"]),
        ({"caption.decode.min_length": -1}, ["'caption.decode.min_length'", "greater than or equal to 0"]),
        ({"evaluate.decode.min_length": 9, "evaluate.decode.max_length": 8},
         ["'evaluate.decode'", "min_length (9) cannot exceed max_length (8)"]),
        ({"caption.decode.length_penalty": float("nan")}, ["'caption.decode.length_penalty'", "finite number"]),
        ({"evaluate.decode.concept_guidance": -0.5}, ["'evaluate.decode.concept_guidance'", "greater than or equal to 0"]),
        ({"caption.format": "xml"}, ["'caption.format'", "'text', 'jsonl' or 'tsv'", "'xml'"]),
        ({"evaluate.limit": 0}, ["'evaluate.limit'", "greater than or equal to 1"]),
    ],
    ids=["beams", "max-length", "min-length", "min-over-max", "length-penalty", "guidance", "format", "limit"],
)
def test_bad_decode_values_name_the_field(cli, expected):
    message = config_error(cli=cli, environ={})
    for part in expected:
        assert part in message, message


def test_decode_settings_checks_its_fields_where_it_is_built():
    """The library's own DecodeSettings is the same group: a bad search fails on creation, not in generate."""
    with pytest.raises(ValueError, match="min_length"):
        DecodeSettings(min_length=5, max_length=4)
    with pytest.raises(ValueError, match="beams"):
        DecodeSettings(beams=0)
    assert DecodeSettings(min_length=4, max_length=4).max_length == 4
    assert hash(DecodeSettings(beams=5)) == hash(DecodeSettings(beams=5))  # a value: caches key on it


def test_caption_and_evaluate_settings_come_from_env_and_file_under_the_cli(tmp_path):
    config = write_config(tmp_path, "caption: {decode: {beams: 3}, format: jsonl}\nevaluate: {split: val}\n")
    environ = {"CAPCLI_CAPTION__DECODE__BEAMS": "2", "CAPCLI_EVALUATE__DECODE__MAX_LENGTH": "12",
               "CAPCLI_EVALUATE__SPLIT": "train"}
    s = load_settings(config, environ=environ)
    assert (s.caption.decode.beams, s.caption.format) == (3, "jsonl")  # the file over the environment
    assert (s.evaluate.split, s.evaluate.decode.max_length) == ("val", 12)
    s = load_settings(config, {"caption.decode.beams": 1, "evaluate.split": "test_novel"}, environ=environ)
    assert (s.caption.decode.beams, s.evaluate.split) == (1, "test_novel")  # the command line over both
    assert Settings().caption.decode == Settings().evaluate.decode == DecodeSettings(beams=5)
