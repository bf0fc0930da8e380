"""Rewrite the README's config reference from raytrain.config.reference() (tests/test_readme.py checks it)."""
import re
from pathlib import Path

from raytrain.config import reference

readme = Path(__file__).resolve().parents[1] / "README.md"
marker = "<!-- config-reference: generated from raytrain.config.reference(); tests/test_readme.py checks it -->\n"
text = readme.read_text()
head, rest = text.split(marker)
rest = re.sub(r"\A```\n.*?\n```\n", lambda _: f"```\n{reference()}\n```\n", rest, count=1, flags=re.S)
readme.write_text(head + marker + rest)
