"""A setting's help: its docstring on one line, its default under each preset, and its value as shown."""

from __future__ import annotations

import functools
from typing import Any

from pydantic import BaseModel

from capcli.settings.groups import PRESETS, Settings
from capcli.settings.loading import config_path, load_settings, read_yaml


def field_doc(key: str, root: type[BaseModel] = Settings) -> str:
    """The docstring of a dotted setting (``pretrain.engine.epochs``) on one line: the CLI help and docs share it."""
    model: type[BaseModel] = root
    *groups, leaf = key.split(".")
    for group in groups:
        model = model.model_fields[group].annotation  # a nested group's class
    return " ".join((model.model_fields[leaf].description or "").split())


@functools.cache
def _preset(preset: str) -> tuple[Settings, dict[str, Any]]:
    """A preset's resolved settings (no environment, no file) and its profile as written."""
    return load_settings(cli={"model.preset": preset}, environ={}), read_yaml(config_path(f"presets/{preset}.yaml"))


def preset_defaults(key: str) -> dict[str, Any]:
    """A dotted setting's field default, then the value of each preset whose profile changes it.

    ``preset_defaults("pretrain.engine.epochs")`` is ``{"default": 10, "tiny": 16}``: what the CLI
    help prints as ``[default: 10; tiny: 16]``.
    """
    parts = key.split(".")
    out = {"default": functools.reduce(getattr, parts, Settings())}
    for preset in PRESETS:
        settings, profile = _preset(preset)
        value = functools.reduce(getattr, parts, settings)
        written = functools.reduce(lambda node, part: node.get(part, {}) if isinstance(node, dict) else {},
                                   parts[:-1], profile)
        if isinstance(written, dict) and parts[-1] in written and value != out["default"]:
            out[preset] = value
    return out


def shown(value: Any, none: str = "none") -> str:
    """A setting's value as the help and the docs print it: ``true``, ``3e-05``, ``[a, b]``; None as ``none``
    (the docs say ``null``, as YAML writes it)."""
    if value is None:
        return none
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)
