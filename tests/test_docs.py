"""The generated docs are current: adding an option or a setting without regenerating them fails here.

Regenerate with ``python -m capcli.docgen``.
"""

from __future__ import annotations

from capcli.docgen import (
    CLI_DOC,
    CONFIG_DOC,
    cli_markdown,
    configuration_doc,
    settings_rows,
)
from capcli.settings import Settings

STALE = "is stale: run `python -m capcli.docgen` and commit the result"


def test_the_cli_reference_is_current() -> None:
    assert CLI_DOC.read_text(encoding="utf-8") == cli_markdown(), f"{CLI_DOC.name} {STALE}"


def test_the_settings_table_is_current() -> None:
    current = CONFIG_DOC.read_text(encoding="utf-8")
    assert current == configuration_doc(current), f"{CONFIG_DOC.name} {STALE}"


def test_every_setting_has_a_row_with_its_meaning() -> None:
    rows = settings_rows()
    keys = [key for key, _, _ in rows]
    assert len(keys) == len(set(keys))
    assert "pretrain.engine.batch_size" in keys and "benchmark.repeats" in keys and "runtime.local_loss" in keys
    assert all(meaning for _, _, meaning in rows), [key for key, _, meaning in rows if not meaning]
    assert dict((k, d) for k, d, _ in rows)["align.optimizer.lr"] == str(Settings().align.optimizer.lr)


def test_a_new_option_would_be_caught(monkeypatch) -> None:
    """The check can fail: a setting added to the models changes the generated table."""
    import capcli.docgen as docgen

    current = CONFIG_DOC.read_text(encoding="utf-8")
    rows = docgen.settings_rows()
    monkeypatch.setattr(docgen, "settings_rows", lambda: [*rows, ("runtime.brand_new", "1", "A new setting.")])
    assert configuration_doc(current) != current
