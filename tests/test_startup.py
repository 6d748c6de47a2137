"""``capcli benchmark --sections startup``: one image in one ``capcli caption`` process against ``import torch``.

No speed is asserted; the tests check that both sides are timed, that the ratio is theirs, and
that a caption process that fails is an error, not a figure.
"""

from __future__ import annotations

import json
import sys

import pytest
from typer.testing import CliRunner

from capcli.bench.startup import slowest_imports, wall_seconds
from capcli.cli import app

runner = CliRunner()


def test_a_command_that_writes_no_caption_is_an_error_naming_its_stderr() -> None:
    with pytest.raises(RuntimeError, match="exited 3 with no caption: boom"):
        wall_seconds([sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"])
    assert wall_seconds([sys.executable, "-c", "print('a caption')"]) > 0
    assert wall_seconds([sys.executable, "-c", "pass"], caption=False) > 0  # the floor prints nothing


def test_slowest_imports_names_top_level_packages_in_seconds() -> None:
    found = slowest_imports([sys.executable, "-c", "import json, email.parser"], count=100)
    assert "json" in found and "email" in found
    assert all("." not in name and 0 <= seconds < 60 for name, seconds in found.items())


@pytest.mark.slow(seconds=35)
def test_one_image_one_process_is_timed_against_import_torch() -> None:
    env = {"CAPCLI_BENCHMARK__IMAGES": "4", "CAPCLI_BENCHMARK__METRIC_CAPTIONS": "4", "CAPCLI_RUNTIME__DEVICE": "cpu"}
    result = runner.invoke(app, ["benchmark", "--json", "--quiet", "--repeats", "1", "--steps", "2",
                                 "--batch-size", "4", "--sections", "startup"], env=env)
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert [k for k in d if k not in ("range", "context")] == ["startup_torch_s", "startup_caption_s",
                                                               "startup_caption_over_torch"]
    assert d["startup_caption_over_torch"] == pytest.approx(d["startup_caption_s"] / d["startup_torch_s"])
    assert "torch" in d["context"]["startup_imports"]
