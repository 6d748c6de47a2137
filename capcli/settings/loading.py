"""Loading the settings: the layers merged, validated, and written back out as YAML.

Precedence, lowest first (DESIGN §2):

1. the field defaults of the groups (``configs/default.yaml`` is the same values, written out);
2. the model preset's profile (``configs/presets/<preset>.yaml``), so that the small CPU
   preset brings its own sizes without the user repeating them;
3. environment variables ``CAPCLI_<GROUP>__<FIELD>`` (nested with ``__``);
4. the ``--config`` YAML file;
5. command-line options.

A bad value or an unknown key is a ConfigError with a one-line message that names the key.
"""

from __future__ import annotations

import difflib
import os
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict

from capcli.errors import ConfigError
from capcli.settings.groups import PRESETS, ModelSettings, Settings, StrictGroup

ENV_PREFIX = "CAPCLI_"


class _EnvReader(BaseSettings):
    """Only used to parse ``CAPCLI_*`` variables with pydantic-settings' own rules."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid")
    model: dict[str, Any] = {}
    data: dict[str, Any] = {}
    runtime: dict[str, Any] = {}
    pretrain: dict[str, Any] = {}
    align: dict[str, Any] = {}
    benchmark: dict[str, Any] = {}
    caption: dict[str, Any] = {}
    evaluate: dict[str, Any] = {}


def config_path(name: str) -> Path:
    """A config file shipped inside the package, e.g. ``default.yaml`` or ``presets/tiny.yaml``."""
    return Path(str(resources.files("capcli") / "configs" / name))


def shipped_or_file(config: Path | str) -> Path:
    """``--config`` takes a file, or the name of a config shipped in the package (``ablation``)."""
    path = Path(config)
    if path.is_file():
        return path
    for name in (f"{config}", f"{config}.yaml"):
        if "/" not in str(config) and config_path(name).is_file():
            return config_path(name)
    return path


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors a user can act on."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a YAML text file (byte {err.start} is not UTF-8)") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({(str(err).splitlines() or ['?'])[0]})") from None
    except (OSError, RecursionError) as err:
        raise ConfigError(f"{path}: cannot be read ({type(err).__name__}: {err})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of setting groups, got {type(data).__name__}")
    return data


def env_overrides(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """``CAPCLI_GROUP__FIELD=value`` variables as a nested dict (values still strings)."""
    environ = dict(os.environ if environ is None else environ)
    groups = set(Settings.model_fields)
    for key in environ:
        if key.upper().startswith(ENV_PREFIX):
            group = key[len(ENV_PREFIX):].split("__")[0].lower()
            if group not in groups:
                raise ConfigError(f"unknown setting {key}: the group must be one of {', '.join(sorted(groups))}")
            if "__" not in key[len(ENV_PREFIX):]:
                raise ConfigError(f"{key} names a whole group; set one field as {key.upper()}__FIELD")
    source = EnvSettingsSource(_EnvReader, env_prefix=ENV_PREFIX, env_nested_delimiter="__", case_sensitive=False)
    source.env_vars = {k.lower(): v for k, v in environ.items()}
    return {k: v for k, v in source().items() if v}


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Merge ``over`` into a copy of ``base``; nested mappings merge, anything else replaces."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def unflatten(dotted: dict[str, Any], keep_none: bool = False) -> dict[str, Any]:
    """``{"pretrain.engine.epochs": 3}`` → ``{"pretrain": {"engine": {"epochs": 3}}}``.

    None means "not given" on the command line and is dropped, unless ``keep_none``.
    """
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        if value is None and not keep_none:
            continue
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def load_settings(
    config: Path | None = None,
    cli: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
    recorded: dict[str, Any] | None = None,
) -> Settings:
    """Resolve the settings from every layer; raises ConfigError with a one-line message.

    Each layer is merged into the full defaults before validation, so a partial group
    (``align.engine.epochs`` alone) keeps that group's other defaults.

    Args:
        config: an optional YAML file with the same shape as ``configs/default.yaml``.
        cli: dotted keys to values, e.g. ``{"pretrain.engine.epochs": 3}``; None means "not given".
        environ: the environment to read (default ``os.environ``).
        recorded: groups recorded with a run (its ``config.yaml``'s ``data``, say), standing in for
            the defaults and the preset's profile: environment, file and CLI still override them.
    """
    upper = deep_merge(env_overrides(environ), read_yaml(shipped_or_file(config)) if config else {})
    upper = deep_merge(upper, unflatten(cli or {}))
    model = upper.get("model")
    preset = model.get("preset", ModelSettings().preset) if isinstance(model, dict) else ModelSettings().preset
    profile = read_yaml(config_path(f"presets/{preset}.yaml")) if preset in PRESETS else {}
    try:
        base = deep_merge(deep_merge(Settings().model_dump(), profile), recorded or {})
        return Settings.model_validate(deep_merge(base, upper))
    except ValidationError as err:
        raise ConfigError(describe_error(err)) from None


def override(settings: Settings, dotted: dict[str, Any]) -> Settings:
    """A copy of ``settings`` with dotted keys replaced (None is a value here), validated again."""
    try:
        return Settings.model_validate(deep_merge(settings.model_dump(), unflatten(dotted, keep_none=True)))
    except ValidationError as err:
        raise ConfigError(describe_error(err)) from None


def validated(group: type[StrictGroup], values: dict[str, Any]) -> StrictGroup:
    """One settings group built from ``values``; a bad value raises ConfigError naming the field."""
    try:
        return group.model_validate(values)
    except ValidationError as err:
        raise ConfigError(describe_error(err)) from None


def describe_error(err: ValidationError) -> str:
    """The first validation error as one line that names the key and what is allowed."""
    first = err.errors()[0]
    loc = [str(part) for part in first["loc"]]
    key = ".".join(loc) or "settings"
    if first["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        close = difflib.get_close_matches(loc[-1], allowed, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"unknown setting '{key}'{hint} (allowed here: {', '.join(allowed)})"
    given = first.get("input")
    shown = "" if isinstance(given, dict) else f" (got {given!r})"
    return f"invalid setting '{key}': {first['msg']}{shown}"


def _allowed_keys(loc: list[str]) -> list[str]:
    model: type[BaseModel] = Settings
    for part in loc:
        annotation = model.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        model = annotation
    return sorted(model.model_fields)


def to_yaml(settings: Settings) -> str:
    """The resolved settings as YAML, as written to each run's ``config.yaml``."""
    return yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False)
