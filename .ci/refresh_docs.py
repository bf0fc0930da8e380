"""Rewrite docs/configuration.md's key reference from raytrain.config.reference() (tests/test_docs.py checks it)."""
import re
from pathlib import Path

from raytrain.config import reference

page = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
marker = "<!-- generated from raytrain.config.reference() by .ci/refresh_docs.py; tests/test_docs.py checks it -->\n"
text = page.read_text()
head, rest = text.split(marker)
rest = re.sub(r"\A```\n.*?\n```\n", lambda _: f"```\n{reference()}\n```\n", rest, count=1, flags=re.S)
page.write_text(head + marker + rest)
