"""Packaging: the wheel holds what an install needs (licence, ``py.typed``, the kernel's C++
source, every module), its console scripts run from outside the checkout, and the README and
``docs/*.md`` link only to files inside the repository.

The wheel is built from a copy of the sources in a temporary folder (so nothing is written into
the checkout and two pytest workers never share a build folder), with the development
environment's setuptools (``--no-build-isolation``, no network), and installed with
``pip install --target`` into another temporary folder that the console scripts then see
through ``PYTHONPATH``.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bame_apps.console import SCRIPTS

tomllib = pytest.importorskip("tomllib")
pytest.importorskip("setuptools", reason="building the wheel needs setuptools (no isolation)")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@dataclass(frozen=True)
class Installed:
    """A built wheel and the folder it was installed into (``pip install --target``)."""

    wheel: Path
    target: Path
    names: frozenset[str]

    def read(self, name: str) -> str:
        with zipfile.ZipFile(self.wheel) as archive:
            return archive.read(name).decode()


def _package_dirs() -> dict[str, Path]:
    """``{package: source folder}`` of the top-level packages (the library and the
    applications) and of every mapped package."""
    mapped = PYPROJECT["tool"]["setuptools"].get("package-dir", {})
    top = {name: ROOT / name for name in ("bame_optim", "bame_apps")}
    return top | {k: ROOT / v for k, v in mapped.items()}


def _pip_env() -> dict[str, str]:
    return {**os.environ, "PYTHONNOUSERSITE": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def _run(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{command} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """Build the wheel from a copy of the sources and install it into a temporary folder."""
    base = tmp_path_factory.mktemp("packaging")
    source = base / "source"
    source.mkdir()
    project = PYPROJECT["project"]
    for name in ["pyproject.toml", project["readme"], *project.get("license-files", [])]:
        shutil.copy2(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.egg-info", "build")
    for folder in {path.relative_to(ROOT).parts[0] for path in _package_dirs().values()}:
        shutil.copytree(ROOT / folder, source / folder, ignore=ignore)
    pip = [sys.executable, "-m", "pip"]
    offline = ["--no-deps", "--no-index", "-q"]
    build = ["wheel", *offline, "--no-build-isolation", "-w", str(base / "dist"), str(source)]
    _run([*pip, *build], base, _pip_env())
    (wheel,) = (base / "dist").glob("bame_optim-*.whl")
    target = base / "target"
    _run([*pip, "install", *offline, "--target", str(target), str(wheel)], base, _pip_env())
    with zipfile.ZipFile(wheel) as archive:
        names = frozenset(archive.namelist())
    return Installed(wheel, target, names)


def test_wheel_holds_licence_typing_marker_and_kernel_source(installed: Installed) -> None:
    licences = [n for n in installed.names if n.endswith(".dist-info/licenses/LICENSE")]
    assert len(licences) == 1, sorted(installed.names)
    assert installed.read(licences[0]) == (ROOT / "LICENSE").read_text()
    assert "MIT License" in installed.read(licences[0])
    metadata = next(n for n in installed.names if n.endswith(".dist-info/METADATA"))
    assert "License-Expression: MIT" in installed.read(metadata)
    assert "bame_optim/py.typed" in installed.names
    csrc = ROOT / "bame_optim" / "kernels" / "csrc"
    sources = sorted([*csrc.glob("*.cpp"), *csrc.glob("*.h")])
    assert sources, "no C++ kernel source found in the checkout"
    for cpp in sources:
        assert f"bame_optim/kernels/csrc/{cpp.name}" in installed.names


def test_wheel_holds_every_module_of_the_source_folders(installed: Installed) -> None:
    """A package missing from the hand-written ``packages`` list would be left out silently."""
    expected = {
        f"{package.replace('.', '/')}/{path.relative_to(folder).as_posix()}"
        for package, folder in _package_dirs().items()
        for path in folder.rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert sorted(expected - installed.names) == []


def test_console_scripts_point_at_the_console_module(installed: Installed) -> None:
    declared = {name: f"bame_apps.console:{function}" for name, (function, _) in SCRIPTS.items()}
    assert PYPROJECT["project"]["scripts"] == declared
    entry_points = configparser.ConfigParser(delimiters=("=",))
    entry_points.optionxform = str  # type: ignore[assignment,method-assign]  # keep case
    name = next(n for n in installed.names if n.endswith(".dist-info/entry_points.txt"))
    entry_points.read_string(installed.read(name))
    assert dict(entry_points["console_scripts"]) == declared
    for _, module in SCRIPTS.values():
        assert f"{module.replace('.', '/')}.py" in installed.names
    assert sorted(p.name for p in (installed.target / "bin").iterdir()) == sorted(SCRIPTS)


HELP_EVERY_SCRIPT = """
import contextlib, io, json, sys
from importlib.metadata import distribution

dist = distribution("bame_optim")
results = {}
for entry in dist.entry_points:
    if entry.group != "console_scripts":
        continue
    function = entry.load()
    sys.argv = [entry.name, "--help"]
    out = io.StringIO()
    code = "returned without exiting"
    with contextlib.redirect_stdout(out):
        try:
            function()
        except SystemExit as stop:
            code = stop.code
    results[entry.name] = {"code": code, "help": out.getvalue()}
files = [getattr(m, "__file__", None) for m in list(sys.modules.values())]
print(json.dumps({
    "dist": str(dist.locate_file("")),
    "results": results,
    "files": [f for f in files if f and f.startswith("/")],
    "prefixes": [sys.prefix, sys.base_prefix],
}))
"""


def _outside(installed: Installed, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A working directory outside the checkout, and an environment that sees the install."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {**_pip_env(), "PYTHONPATH": str(installed.target), "MPLBACKEND": "Agg"}
    return cwd, env


def test_every_console_script_helps_from_outside_the_checkout(
    installed: Installed, tmp_path: Path
) -> None:
    """Each entry point resolves from the installed wheel and its ``--help`` exits 0, with no
    module of the checkout loaded (``examples``, ``benchmarks`` or ``bame_optim`` from here)."""
    cwd, env = _outside(installed, tmp_path)
    done = _run([sys.executable, "-c", HELP_EVERY_SCRIPT], cwd, env)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(report["dist"]).resolve() == installed.target.resolve()
    assert sorted(report["results"]) == sorted(SCRIPTS)
    for name, result in report["results"].items():
        assert result["code"] == 0, (name, result)
        assert result["help"].startswith("usage:"), (name, result["help"][:200])
    environment = [Path(p).resolve() for p in report["prefixes"]]
    from_checkout = [
        f
        for f in map(Path, report["files"])
        if f.resolve().is_relative_to(ROOT)
        and not any(f.resolve().is_relative_to(p) for p in environment)
    ]
    assert from_checkout == []
    assert any(Path(f).resolve().is_relative_to(installed.target) for f in report["files"])


def test_generated_script_and_python_m_run_from_outside_the_checkout(
    installed: Installed, tmp_path: Path
) -> None:
    """The wrapper pip writes into ``bin/`` runs, and so does ``python -m`` on an installed
    benchmark (its imports of ``.harness`` are relative, so they work under either name)."""
    cwd, env = _outside(installed, tmp_path)
    script = installed.target / "bin" / "bame-bench-flops"
    done = _run([sys.executable, str(script), "--help"], cwd, env)
    assert done.stdout.startswith("usage: bame-bench-flops")
    done = _run([sys.executable, "-m", "bame_apps.benchmarks.step", "--help"], cwd, env)
    assert "usage:" in done.stdout and "--models" in done.stdout


# Markdown links -------------------------------------------------------------------------------

FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")
INLINE_LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]\n]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
SHARED = re.compile(r"(\.\./|/work/)shared\b")
TEAM_MARKER = re.compile(r"this\s+team's", re.IGNORECASE)


def markdown_links(text: str) -> list[str]:
    """Link targets of ``text``: inline ``[text](target)``, images and reference definitions,
    outside code blocks and code spans."""
    prose = CODE_SPAN.sub("", FENCE.sub("", text))
    return INLINE_LINK.findall(prose) + REFERENCE_LINK.findall(prose)


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors of the headings of ``text`` (lower case, punctuation dropped, spaces
    to hyphens)."""
    anchors = set()
    for line in FENCE.sub("", text).splitlines():
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            title = re.sub(r"[^\w\- ]", "", heading.group(1).lower().replace("`", ""))
            anchors.add(title.replace(" ", "-"))
    return anchors


def test_markdown_links_parser() -> None:
    text = (
        "See [a](docs/a.md) and [b](<b c.md>), ![img](x.png \"title\"), [web](https://x.org),\n"
        "`[not](a-link.md)` here.\n\n```\n[nor](this.md)\n```\n[ref]: ../LICENSE\n"
    )
    assert markdown_links(text) == ["docs/a.md", "x.png", "https://x.org", "../LICENSE"]
    assert heading_anchors("# Set up and run\n## 2. The `step` counter\n") == {
        "set-up-and-run",
        "2-the-step-counter",
    }


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_exist_inside_the_repository(doc: Path) -> None:
    problems = []
    for target in markdown_links(doc.read_text()):
        if SCHEME.match(target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (doc.parent / path).resolve() if path else doc
        if not resolved.is_relative_to(ROOT):
            problems.append(f"{target}: outside the repository")
        elif not resolved.exists():
            problems.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in heading_anchors(
            resolved.read_text()
        ):
            problems.append(f"{target}: no heading #{anchor} in {resolved.name}")
    assert problems == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_paths_into_shared_are_marked_as_this_teams_copy(doc: Path) -> None:
    """A clone has no ``../shared``: a paragraph may name it only as this team's local copy."""
    unmarked = [
        paragraph
        for paragraph in re.split(r"\n\s*\n", doc.read_text())
        if SHARED.search(paragraph) and not TEAM_MARKER.search(paragraph)
    ]
    assert unmarked == []
