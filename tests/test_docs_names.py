"""Every dotted Python name the documentation mentions exists: ``braintumor.x.y`` anywhere, and
``data.x``, ``models.x``... in backticks (module paths inside the package), so a reader who copies
one from README, the model card or docs/ finds it."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "MODEL_CARD.md", *sorted((ROOT / "docs").rglob("*.md"))]
SUBPACKAGES = "data|models|inference|evaluation|serving|pacs|training"
FULL = re.compile(r"\bbraintumor(?:\.[A-Za-z_]\w*)+")
INSIDE = re.compile(rf"`((?:{SUBPACKAGES})(?:\.[A-Za-z_]\w*)+)")


def mentioned() -> list[tuple[str, str]]:
    names = set()
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        names |= {(m.group(0).rstrip("."), doc.name) for m in FULL.finditer(text)}
        names |= {("braintumor." + m.group(1).rstrip("."), doc.name) for m in INSIDE.finditer(text)}
    return sorted(names)


def resolve(name: str) -> object:
    """The object a dotted name names: the longest importable module, then attributes."""
    parts = name.split(".")
    for split in range(len(parts), 0, -1):
        try:
            found: object = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[split:]:
            found = getattr(found, attribute)
        return found
    raise ModuleNotFoundError(name)


def test_the_docs_mention_names_at_all() -> None:
    assert len(mentioned()) >= 15


@pytest.mark.parametrize(("name", "doc"), mentioned())
def test_every_dotted_name_in_the_docs_exists(name: str, doc: str) -> None:
    try:
        resolve(name)
    except (ModuleNotFoundError, AttributeError) as exc:
        pytest.fail(f"{doc} mentions {name}, which does not exist ({exc})")
