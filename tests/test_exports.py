"""The public surface: what ``import alf_analytics`` offers, and nothing framework-specific."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

import alf_analytics


def test_all_lists_the_public_names() -> None:
    public = {
        name
        for name, value in vars(alf_analytics).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    public.discard("annotations")  # from __future__
    assert set(alf_analytics.__all__) == public | {"__version__"}


def test_importing_the_package_imports_no_framework() -> None:
    code = (
        "import sys, alf_analytics, alf_analytics.wsgi, alf_analytics.asgi\n"
        "loaded = [m for m in ('django', 'flask', 'starlette', 'werkzeug', 'fastapi') "
        "if m in sys.modules]\n"
        "print(','.join(loaded))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_the_django_adapter_without_django_says_to_install_it() -> None:
    """Without Django, ``import alf_analytics.django`` failed with "No module named 'asgiref'"
    (Django's dependency, imported first): nothing said Django or the extra was missing."""
    code = (
        "import sys\n"
        "class NoDjango:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.partition('.')[0] in ('django', 'asgiref'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, NoDjango())\n"
        "import alf_analytics, alf_analytics.wsgi, alf_analytics.asgi\n"
        "try:\n"
        "    import alf_analytics.django\n"
        "except ImportError as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("ModuleNotFoundError "), out.stdout
    assert "needs Django" in out.stdout, out.stdout
    assert "pip install 'alf-analytics[django]'" in out.stdout, out.stdout


def test_importing_the_package_leaves_the_root_logger_alone() -> None:
    code = (
        "import logging\n"
        "root = logging.getLogger()\n"
        "before = (root.level, list(root.handlers))\n"
        "import alf_analytics\n"
        "alf_analytics.AnalyticsWSGIMiddleware(lambda e, s: [], service_token='t' * 12)\n"
        "assert (root.level, list(root.handlers)) == before, (root.level, root.handlers)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_prints_the_version() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "alf_analytics.cli", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == f"alf-analytics {alf_analytics.__version__}"


def test_extras_and_classifiers_match_tox() -> None:
    """Each framework has an extra with its supported range; tox tests the listed Pythons."""
    import configparser
    import re
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    root = Path(__file__).parent.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    for extra in ("flask", "django", "starlette", "fastapi", "collector"):
        assert extra in extras, extra
    for extra in ("flask", "django", "starlette", "fastapi"):
        assert all(">=" in req and "<" in req for req in extras[extra]), extras[extra]
    tox = configparser.ConfigParser()
    tox.read(root / "tox.ini")
    envs = tox["tox"]["env_list"]
    tested = {
        f"3.{minor}"
        for group in re.findall(r"py\{([\d,]+)\}", envs)
        for minor in (v[1:] for v in group.split(","))
    }
    classified = {
        c.rpartition(" :: ")[2]
        for c in project["classifiers"]
        if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    }
    assert classified == tested


def test_the_collector_extra_excludes_an_anyio_it_cannot_start_with() -> None:
    """``anyio>=4`` let pip keep anyio 4.0 or 4.1, whose ``CapacityLimiter`` cannot be made
    outside an event loop: ``create_app()`` (so ``alf-analytics collector``) then died with
    sniffio's AsyncLibraryNotFoundError. 4.2 is the first that works."""
    from pathlib import Path

    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    root = Path(__file__).parent.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    for req in map(Requirement, project["optional-dependencies"]["collector"]):
        if req.name == "anyio":
            assert not req.specifier.contains("4.1.0"), req
            assert req.specifier.contains("4.2.0"), req
            break
    else:
        raise AssertionError("the collector extra does not list anyio")


def test_every_docstring_is_valid_utf_8() -> None:
    """A docstring in asgi.py wrote a lone surrogate as the escape ``\\ud800``, not as text:
    from Python 3.13 the compiler encodes docstrings as strict UTF-8 to dedent them, so
    ``import alf_analytics`` failed there with UnicodeEncodeError (3.13 and 3.14 are
    supported)."""
    import ast
    from pathlib import Path

    package = Path(alf_analytics.__file__).parent
    bad = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text("utf-8"), str(path))):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node, clean=False)
                try:
                    (doc or "").encode("utf-8")
                except UnicodeEncodeError:
                    bad.append(f"{path.relative_to(package)}:{getattr(node, 'lineno', 1)}")
    assert bad == []


def test_each_declared_floor_can_be_installed_with_the_others() -> None:
    """Floors that pip can never pick, given the floors beside them: httpx 0.24 and 0.25.0
    need httpcore<1 (the agent needs httpcore>=1.0; httpx 0.25.1 is the first on 1.x), and
    fastapi 0.110.0 needs starlette<0.37 (its extra needs starlette>=0.37; fastapi 0.110.1 is
    the first on 0.37). Installing "the lowest allowed versions" then failed to resolve."""
    from pathlib import Path

    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    root = Path(__file__).parent.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    never = {"httpx": ["0.24.0", "0.25.0"], "fastapi": ["0.110.0"]}
    declared = [
        *project["dependencies"],
        *project["optional-dependencies"]["fastapi"],
    ]
    for req in map(Requirement, declared):
        for version in never.get(req.name, []):
            assert not req.specifier.contains(version), (req, version)
