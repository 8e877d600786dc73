"""The README's setup snippets type-check under mypy --strict, and a typo in an option does not."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def setup_snippets() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)[:3]


def mypy(tmp_path: Path, sources: dict[str, str]) -> subprocess.CompletedProcess[str]:
    for name, source in sources.items():
        (tmp_path / name).write_text(source)
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", *sources],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )


@pytest.mark.slow
def test_readme_snippets_pass_mypy_strict(tmp_path: Path) -> None:
    flask, fastapi, django = setup_snippets()
    assert "AnalyticsWSGIMiddleware" in flask and "add_middleware" in fastapi
    assert "ALF_ANALYTICS" in django
    # A misspelled option must be caught the same way, or the check proves nothing.
    typo = fastapi.replace("environment=", "enviroment=")
    done = mypy(
        tmp_path,
        {"flask_app.py": flask, "fastapi_app.py": fastapi, "settings.py": django, "typo.py": typo},
    )
    errors = [line for line in done.stdout.splitlines() if ": error:" in line]
    assert all(line.startswith("typo.py:") for line in errors), done.stdout
    assert any('Unexpected keyword argument "enviroment"' in line for line in errors), done.stdout
