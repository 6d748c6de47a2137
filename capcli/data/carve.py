"""The carve belongs to the run: the data settings recorded with a checkpoint, and the check
that a held-out split holds none of the images the run trained on (DESIGN §5, "Carving").

A source without val/test splits has them carved out of train by ``data.seed`` and the sizes
(``sources._ensure_eval_splits``), so the same source read with other sizes is another carve,
and training images can land in its test split. Each run writes its resolved settings as
``config.yaml``, in the run directory and in every checkpoint. ``evaluate`` and ``align`` on a
checkpoint read its ``data`` group back (:func:`follow_run`) in place of the defaults; the
environment, ``--config`` and the command line still override it, and :func:`carve_changes`
names what then differs. :func:`train_overlap` counts, by content, the held-out images that the
run's training split holds. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capcli.settings import DataSettings, Settings, load_settings, read_yaml

RECORD_FILE = "config.yaml"
# The data settings that decide which images each split holds.
CARVE_KEYS = ("source", "seed", "val_size", "test_size", "train_split", "image_column", "caption_column",
              "streaming")
# synthetic: every size and the image size name another rendered dataset (synthetic.materialise).
SYNTHETIC_KEYS = ("train_size", "image_size")


@dataclass(frozen=True)
class RunData:
    """The settings a command on a checkpoint runs with, and the data settings its run recorded."""

    settings: Settings
    recorded: DataSettings | None = None
    """The run's data settings; None for a checkpoint written before runs recorded them."""
    record: Path | None = None
    """The file they were read from."""
    changes: list[str] = field(default_factory=list)
    """Each carve setting that differs from the run's, as ``data.KEY recorded → used``."""

    def warning(self, checkpoint: Path) -> str | None:
        """The line to print on stderr when the data are not the run's, else None."""
        if self.recorded is None:
            return (f"{checkpoint} records no data settings (it predates {RECORD_FILE} in checkpoints): reading "
                    f"data.source '{self.settings.data.source}' as given; its held-out splits may hold training images")
        if self.changes:
            return (f"data settings differ from the run's ({'; '.join(self.changes)}): the held-out splits are not "
                    f"the run's; drop these options to use the run's carve")
        return None


def record_of(checkpoint: Path) -> Path | None:
    """The ``config.yaml`` recorded with a checkpoint: its own, else its run directory's."""
    checkpoint = Path(checkpoint)
    candidates = [checkpoint / RECORD_FILE]
    if checkpoint.parent.name == "checkpoints":  # runs/NAME/checkpoints/best → runs/NAME/config.yaml
        candidates.append(checkpoint.parent.parent / RECORD_FILE)
    return next((path for path in candidates if path.is_file()), None)


def recorded_data(checkpoint: Path) -> tuple[dict[str, Any], Path] | None:
    """The ``data`` group recorded with a checkpoint, limited to the settings this version knows."""
    path = record_of(checkpoint)
    if path is None:
        return None
    data = read_yaml(path).get("data")
    if not isinstance(data, dict):
        return None
    return {key: value for key, value in data.items() if key in DataSettings.model_fields}, path


def follow_run(checkpoint: Path, config: Path | None, cli: dict[str, Any],
               environ: dict[str, str] | None = None) -> RunData:
    """Settings for a command on ``checkpoint``: its run's data settings in place of the defaults.

    Precedence, lowest first: defaults and preset, the run's recorded ``data``, environment,
    ``--config``, command line (as ``settings.load_settings``).
    """
    found = recorded_data(checkpoint)
    if found is None:
        return RunData(load_settings(config, cli, environ))
    data, path = found
    settings = load_settings(config, cli, environ, recorded={"data": data})
    recorded = DataSettings.model_validate(data)
    return RunData(settings, recorded, path, carve_changes(recorded, settings.data))


def carve_changes(recorded: DataSettings, used: DataSettings) -> list[str]:
    """The carve settings of ``used`` that differ from ``recorded``, as ``data.KEY old → new``."""
    keys = CARVE_KEYS + (SYNTHETIC_KEYS if "synthetic" in (recorded.source, used.source) else ())
    return [f"data.{key} {getattr(recorded, key)} → {getattr(used, key)}" for key in keys
            if getattr(recorded, key) != getattr(used, key)]


def image_key(value: Any) -> str | None:
    """A digest of an image's bytes (a ``datasets`` Image value or a path); None when unreadable.

    By content, not by name: the same picture under two names, or in a copy of the folder, is
    the same training image.
    """
    try:
        if isinstance(value, dict):
            data = value.get("bytes") or Path(value["path"]).read_bytes()
        else:
            data = Path(value).read_bytes()
    except (OSError, TypeError, KeyError):
        return None  # an image that cannot be read was never trained on either
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def train_overlap(train_images: Iterable[Any], held_out_images: Iterable[Any]) -> int:
    """How many of ``held_out_images`` are, byte for byte, among ``train_images``."""
    seen = {key for key in map(image_key, train_images) if key is not None}
    return sum(1 for value in held_out_images if image_key(value) in seen)
