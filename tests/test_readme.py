from pathlib import Path

from raytrain.config import reference

ROOT = Path(__file__).resolve().parents[1]


def test_readme_config_reference_is_current():
    assert reference() in (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    assert "pip install -c constraints.txt -e '.[dev]' && python -m pytest -q" in readme
    assert "pip install -q -c constraints.txt -e '.[dev]'" in ci and "python -m pytest -q" in ci
