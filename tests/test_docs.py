"""The README is a front door and the docs are current: the generated key reference, the two commands, CI."""
import re
from pathlib import Path

from raytrain.config import reference

ROOT = Path(__file__).resolve().parents[1]


def test_the_configuration_page_holds_every_key_as_generated():
    assert f"```\n{reference()}\n```" in (ROOT / "docs" / "configuration.md").read_text()


def test_ci_runs_the_readme_test_command():
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    assert "pip install -c constraints.txt -e '.[dev]' && python -m pytest -q" in readme
    assert "pip install -q -c constraints.txt -e '.[dev]'" in ci and "python -m pytest -q" in ci


def test_the_readme_is_a_front_door_and_its_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    for target in re.findall(r"\]\(((?:docs|cluster)/[^)#]+)", readme):
        assert (ROOT / target).exists(), target
