"""The embedded procedural dataset "synthetic": coloured shapes with true captions.

The scenes themselves (graph, captions, rendering, the vocabulary they share with the
caption reader and the grounding metric) live in ``capcli.scenes``. This module makes a
dataset of them: ``generate`` ties a scene, its five captions and its image together
deterministically from ``(seed, split, index)``, and ``materialise`` writes whole splits to
disk as a Hugging Face "imagefolder" directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

from capcli.errors import ConfigError
from capcli.scenes import NOVEL_COMBOS, Scene, describe, render, sample_scene

DATASET_VERSION = "v2"  # bump whenever scenes, captions or pixels change
SPLITS = ("train", "val", "test", "test_novel")


def generate(split: str, index: int, seed: int) -> tuple[Scene, list[str]]:
    """Returns the scene and captions number ``index`` of ``split``.

    A pure function of ``(seed, split, index)``: a string-seeded
    ``random.Random`` is stable across processes, unlike ``hash()``.
    """
    if split not in SPLITS:
        raise ConfigError(f"unknown synthetic split {split!r}; expected one of {SPLITS}")
    rng = random.Random(f"{seed}:{split}:{index}")
    scene = sample_scene(rng, novel=split == "test_novel")
    return scene, describe(scene, rng)


def _is_complete(path: Path) -> bool:
    return (path / ".complete").is_file()


def materialise(root: Path, sizes: dict[str, int], seed: int = 0, image_size: int = 64) -> Path:
    """Writes the dataset under ``root`` once and returns its directory.

    The directory ``synthetic-v2-s{seed}-{image_size}px-{hash}`` holds
    ``train/``, ``val/``, ``test/`` and ``test_novel/``, each with
    ``000000.png``... and a ``metadata.jsonl`` of rows ``{"file_name",
    "captions", "scene"}``. All four split folders are always created; a split
    missing from ``sizes`` or of size 0 gets an empty ``metadata.jsonl``.

    The data is built in a temporary sibling and renamed into place, with the
    ``.complete`` marker written last, so an interrupted run never leaves a
    directory that looks finished. A directory that already has the marker is
    returned untouched; if another process wins a race, its copy is used.

    Raises:
        ConfigError: If ``sizes`` names an unknown split or a negative count.
    """
    unknown = set(sizes) - set(SPLITS)
    if unknown or any(int(n) < 0 for n in sizes.values()):
        raise ConfigError(f"bad synthetic sizes {sizes!r}: splits are {SPLITS}, counts >= 0")
    counts = {split: int(sizes.get(split, 0)) for split in SPLITS}
    digest = hashlib.sha256(json.dumps(counts, sort_keys=True).encode()).hexdigest()[:8]
    root = Path(root)
    final = root / f"synthetic-{DATASET_VERSION}-s{seed}-{image_size}px-{digest}"
    if _is_complete(final):
        return final

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    try:
        tmp.chmod(0o755)  # mkdtemp's private 0700 would otherwise stick to the dataset
        for split, n in counts.items():
            (tmp / split).mkdir()
            with open(tmp / split / "metadata.jsonl", "w", encoding="utf-8") as rows:
                for index in range(n):
                    scene, captions = generate(split, index, seed)
                    name = f"{index:06d}.png"
                    image = render(scene, image_size)
                    # Fast compression: the grain makes PNGs barely compressible anyway.
                    image.save(tmp / split / name, format="PNG", compress_level=1)
                    row = {"file_name": name, "captions": captions, "scene": scene.to_dict()}
                    rows.write(json.dumps(row) + "\n")
        summary = {"version": DATASET_VERSION, "seed": seed, "image_size": image_size,
                   "sizes": counts, "novel_combos": sorted(map(list, NOVEL_COMBOS))}
        (tmp / ".complete").write_text(json.dumps(summary) + "\n", encoding="utf-8")
        try:
            os.replace(tmp, final)
        except OSError:
            if _is_complete(final):  # another process finished first: use its copy
                shutil.rmtree(tmp, ignore_errors=True)
                return final
            # Only complete directories are ever renamed in, so this is debris
            # (e.g. hand-made or from an older layout): replace it.
            shutil.rmtree(final)
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
