"""Typed settings: one pydantic model per group, merged from defaults, preset, env, file and CLI.

- ``groups``: the settings groups, one pydantic model each, and ``Settings`` that holds them.
- ``loading``: the layers (defaults < preset profile < env < ``--config`` < CLI) merged and validated, and YAML.
- ``docs``: a setting's help: its docstring on one line and its default under each preset.
"""

from capcli.settings.docs import field_doc, preset_defaults, shown
from capcli.settings.groups import (
    PRESETS,
    AlignSettings,
    BenchmarkSettings,
    CaptionSettings,
    DataSettings,
    DecodeSettings,
    EngineSettings,
    EvaluateSettings,
    ModelSettings,
    OptimizerSettings,
    PolicySettings,
    PretrainSettings,
    RuntimeSettings,
    Settings,
    Strict,
    StrictGroup,
)
from capcli.settings.loading import (
    ENV_PREFIX,
    config_path,
    deep_merge,
    describe_error,
    env_overrides,
    load_settings,
    override,
    read_yaml,
    shipped_or_file,
    to_yaml,
    unflatten,
    validated,
)

__all__ = [
    "ENV_PREFIX",
    "PRESETS",
    "AlignSettings",
    "BenchmarkSettings",
    "CaptionSettings",
    "DataSettings",
    "DecodeSettings",
    "EngineSettings",
    "EvaluateSettings",
    "ModelSettings",
    "OptimizerSettings",
    "PolicySettings",
    "PretrainSettings",
    "RuntimeSettings",
    "Settings",
    "Strict",
    "StrictGroup",
    "config_path",
    "deep_merge",
    "describe_error",
    "env_overrides",
    "field_doc",
    "shown",
    "load_settings",
    "override",
    "preset_defaults",
    "read_yaml",
    "shipped_or_file",
    "to_yaml",
    "unflatten",
    "validated",
]
