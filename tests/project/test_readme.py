"""The README's configuration table documents exactly the settings the code reads."""

from __future__ import annotations

import re

from bot.settings import Settings
from tests.support import REPO

README = REPO / "README.md"


def documented_settings(readme: str) -> list[str]:
    table = readme.split("<!-- settings-table -->", 1)[1].split("<!-- /settings-table -->", 1)[0]
    return re.findall(r"^\| `([A-Z0-9_]+)` \|", table, flags=re.MULTILINE)


def test_every_setting_is_in_the_readme_table_and_nothing_else() -> None:
    documented = documented_settings(README.read_text())
    fields = [name.upper() for name in Settings.model_fields]
    assert sorted(set(fields) - set(documented)) == [], "settings missing from the README table"
    assert sorted(set(documented) - set(fields)) == [], "README table lists settings the code does not have"
    assert len(documented) == len(set(documented)), "a setting is listed twice"


def test_the_table_parser_sees_a_missing_row() -> None:
    readme = README.read_text()
    without_model = "\n".join(line for line in readme.splitlines() if not line.startswith("| `MODEL` |"))
    assert "MODEL" in documented_settings(readme)
    assert "MODEL" not in documented_settings(without_model)
