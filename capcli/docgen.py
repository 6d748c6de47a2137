"""Docs generated from the code: the CLI reference and the table of every setting.

``python -m capcli.docgen`` rewrites ``docs/cli.md`` (from the Typer app, with Typer's own
markdown writer) and the generated part of ``docs/configuration.md`` (from the pydantic
settings models: key, default, meaning). ``tests/test_docs.py`` fails when either is stale,
so an option or a setting cannot be added without its documentation.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import BaseModel

from capcli.settings import Settings, shown

ROOT = Path(__file__).resolve().parents[1]
CLI_DOC = ROOT / "docs" / "cli.md"
CONFIG_DOC = ROOT / "docs" / "configuration.md"
BEGIN, END = "<!-- generated: settings (python -m capcli.docgen) -->", "<!-- end of generated settings -->"


def cli_markdown() -> str:
    """The reference of every command and option, as Typer writes it."""
    import click
    import typer
    from typer.cli import get_docs_for_click

    from capcli.cli import app

    command = typer.main.get_command(app)
    text = get_docs_for_click(obj=command, ctx=click.Context(command), name="capcli", title="CLI reference")
    header = ("<!-- Generated from the Typer app by `python -m capcli.docgen`; "
              "tests/test_docs.py checks it is current. -->\n\n")
    return header + text.rstrip() + "\n"


def settings_rows(model: BaseModel | None = None, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, meaning) of every setting, in the order the models declare them."""
    model = Settings() if model is None else model
    rows = []
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        key = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            rows.extend(settings_rows(value, f"{key}."))
        else:
            rows.append((key, shown(value, none="null"), " ".join((field.description or "").split())))
    return rows



def settings_markdown() -> str:
    """The generated part of configuration.md: one table per group."""
    lines = [BEGIN, "", "## Every setting", "",
             "Defaults before the model preset's profile (`configs/presets/tiny.yaml` changes a few for "
             "`tiny`, the default preset). Set any of them in a `--config` file, as "
             "`CAPCLI_GROUP__FIELD` (nested with `__`), or with the command's option.", ""]
    group = None
    for key, default, meaning in settings_rows():
        top = key.split(".")[0]
        if top != group:
            group = top
            lines += ["", f"### `{group}`", "", "| setting | default | meaning |", "|---|---|---|"]
        escaped = meaning.replace("|", "\\|")  # a pipe would end the table cell
        lines.append(f"| `{key}` | `{default}` | {escaped} |")
    return "\n".join([*lines, "", END]) + "\n"


def configuration_doc(current: str) -> str:
    """configuration.md with its generated part replaced (appended when it has none yet)."""
    if BEGIN in current and END in current:
        head, rest = current.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        return head + settings_markdown() + ("\n" + tail if tail else "")
    return current.rstrip() + "\n\n" + settings_markdown()


def main() -> int:
    if not CONFIG_DOC.parent.is_dir():
        print("error: docs/ not found: run this from a checkout (pip install -e .)", file=sys.stderr)
        return 2
    CLI_DOC.write_text(cli_markdown(), encoding="utf-8")
    CONFIG_DOC.write_text(configuration_doc(CONFIG_DOC.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"wrote {CLI_DOC.relative_to(ROOT)} and {CONFIG_DOC.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
