"""The method card's API table lists every public name of ``leanscale.cascade``, with the module it lives in."""

from __future__ import annotations

import re
from pathlib import Path

import leanscale.cascade as cascade_pkg

CARD = Path(cascade_pkg.__file__).with_name("README.md")


def _rows() -> dict[str, str]:
    """Each name in the first column of the API table -> the module column of its row."""
    text = CARD.read_text(encoding="utf-8")
    table = text[text.index("## API"):text.index("## Bad input")]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[1].startswith("`") and cells[1] != "module":
            for name in re.findall(r"`([A-Za-z_]\w*)(?:\(|`)", cells[0]):
                rows[name] = cells[1].strip("`")
    return rows


def test_every_public_name_has_a_row_naming_its_module():
    rows = _rows()
    assert sorted(set(cascade_pkg.__all__) - set(rows)) == [], "add a row to the API table of cascade/README.md"
    assert sorted(set(rows) - set(cascade_pkg.__all__)) == [], "the API table lists names the package lacks"
    for name, module in rows.items():
        if name in ("create_app", "serve"):  # imported on first use (FastAPI)
            assert module == "server"
            continue
        obj = getattr(cascade_pkg, name)
        if hasattr(obj, "__module__") and not isinstance(obj, str):
            assert obj.__module__ == f"leanscale.cascade.{module}", name
        else:  # a constant: defined in that module
            assert getattr(getattr(cascade_pkg, f"_{module}"), name) is obj, name
