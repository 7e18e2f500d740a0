"""The documentation site: every public name of ``ball``, ``nn``, ``models`` and ``training`` is
in the API reference (the mkdocstrings directives and the built HTML), the site builds in strict
mode, and the code blocks of the getting-started and tutorial pages run."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# CI runs the tests from a scratch copy; it points here at the repository
ROOT = Path(os.environ.get("POINCARE_RESNET_ROOT", Path(__file__).resolve().parents[1]))
API = ROOT / "docs" / "api"
MODULES = (
    "poincare_resnet.ball",
    "poincare_resnet.nn",
    "poincare_resnet.models",
    "poincare_resnet.training",
)
TUTORIAL_PAGES = ("getting-started.md", "tutorial.md")

needs_docs = pytest.mark.skipif(
    not (ROOT / "mkdocs.yml").is_file(), reason="the docs sources are not next to the tests"
)


def public_names(module: str) -> list[str]:
    mod = importlib.import_module(module)
    names = getattr(mod, "__all__", None)
    if names is None:  # pragma: no cover - every package here has __all__
        names = [n for n in dir(mod) if not n.startswith("_")]
    return [n for n in names if not n.startswith("__")]


def _directives() -> set[str]:
    found: set[str] = set()
    for md in API.glob("*.md"):
        found |= set(re.findall(r"^::: ([\w.]+)\s*$", md.read_text(), flags=re.M))
    return found


@needs_docs
@pytest.mark.parametrize("module", MODULES)
def test_every_public_name_has_an_api_directive(module):
    names = public_names(module)
    assert len(names) >= 8
    missing = [n for n in names if f"{module}.{n}" not in _directives()]
    assert not missing, f"not in docs/api/*.md: {missing}"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The built site: ``$POINCARE_RESNET_SITE`` (CI builds it first) or a strict build here."""
    given = os.environ.get("POINCARE_RESNET_SITE")
    if given:
        return Path(given)
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


@needs_docs
@pytest.mark.parametrize("module", MODULES)
def test_every_public_name_is_rendered_in_the_built_site(site, module):
    html = "".join(p.read_text() for p in (site / "api").rglob("*.html"))
    missing = [n for n in public_names(module) if f'id="{module}.{n}"' not in html]
    assert not missing, f"no rendered entry for: {missing}"


@needs_docs
def test_site_pages_exist_for_every_nav_entry(site):
    for page in ("getting-started", "tutorial", "maths", "layers", "models", "training",
                 "evaluation", "claims", "performance", "gpu-distributed"):  # fmt: skip
        assert (site / page / "index.html").is_file(), page
    maths = (site / "maths" / "index.html").read_text()
    assert "artanh" in maths and "mobius_add" in maths


@needs_docs
@pytest.mark.parametrize("page", TUTORIAL_PAGES)
def test_tutorial_code_blocks_run(page, tmp_path, monkeypatch):
    mktestdocs = pytest.importorskip("mktestdocs")
    pytest.importorskip("tensorboard")
    monkeypatch.chdir(tmp_path)
    text = (ROOT / "docs" / page).read_text()
    assert text.count("```python") >= 3
    mktestdocs.check_md_file(fpath=ROOT / "docs" / page, memory=True)
    assert (tmp_path / "runs").is_dir()  # the blocks really ran here


ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"


def _resolves(dotted: str) -> bool:
    """Whether ``a.b.c`` names a module, or an attribute of the longest importable prefix."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


@needs_docs
def test_architecture_page_names_only_modules_that_exist():
    text = ARCHITECTURE.read_text(encoding="utf-8")
    paths = set(re.findall(r"\bpoincare_resnet/[\w/]+\.(?:py|cpp|h)\b", text))
    dotted = set(re.findall(r"\bpoincare_resnet(?:\.\w+)+", text))
    assert len(paths) >= 30 and len(dotted) >= 4  # the page really names the modules
    assert not [p for p in sorted(paths) if not (ROOT / p).is_file()], "missing files"
    assert not [d for d in sorted(dotted) if not _resolves(d)], "missing names"
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    assert "ARCHITECTURE.md" in nav
