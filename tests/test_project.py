"""Checks of the project itself: declared dependencies stay in sync, set-up commands, import hygiene."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import fresh
import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"torch": "pytorch"}  # PyPI name -> conda-forge name where they differ


def _pyproject_requirements() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        declared += extra
    requirements = {}
    for line in declared:
        requirement = Requirement(line)
        if canonicalize_name(requirement.name) == "valueloss":  # an extra made of other extras
            continue
        requirements[canonicalize_name(requirement.name)] = str(requirement.specifier)
    return requirements


def _environment_requirements() -> dict[str, str]:
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert environment["channels"] == ["conda-forge"]
    entries = []
    for item in environment["dependencies"]:
        if isinstance(item, dict):
            entries += [line for line in item["pip"] if not line.startswith("-e")]
        elif not re.match(r"^(python|pip)\b", item):
            entries.append(item)
    conda_to_pypi = {conda: pypi for pypi, conda in CONDA_NAMES.items()}
    requirements = {}
    for line in entries:
        requirement = Requirement(line)
        name = conda_to_pypi.get(requirement.name, requirement.name)
        requirements[canonicalize_name(name)] = str(requirement.specifier)
    return requirements


def test_environment_yml_matches_pyproject():
    """environment.yml lists exactly pyproject's dependencies and extras, with the same version ranges."""
    assert _environment_requirements() == _pyproject_requirements()


def _pins() -> list[Requirement]:
    lines = [line.split("#")[0].strip() for line in (ROOT / "constraints.txt").read_text().splitlines()]
    return [Requirement(line) for line in lines if line]


def _oldest_tested_python() -> str:
    match = re.search(r"^OLDEST_PYTHON := (3\.\d+\.\d+)$", (ROOT / "Makefile").read_text(), re.M)
    assert match, "the Makefile sets OLDEST_PYTHON := x.y.z"
    return match.group(1)


def test_every_pin_admits_the_oldest_tested_python():
    """Each package pinned in constraints.txt declares a Requires-Python that admits OLDEST_PYTHON (Debian 12's
    3.11.2), read from the installed distribution's own metadata, which must be the pinned version."""
    oldest = _oldest_tested_python()
    environment = {"python_version": ".".join(oldest.split(".")[:2]), "python_full_version": oldest}
    refused = []
    for pin in _pins():
        if pin.marker is not None and not pin.marker.evaluate(environment):
            continue  # a pin for other Pythons only
        (spec,) = pin.specifier
        installed = metadata.distribution(pin.name)
        assert Version(installed.version).public == Version(spec.version).public, (
            f"{pin.name} {installed.version} is installed, constraints.txt pins {spec.version}: run `make venv`")
        requires_python = installed.metadata.get("Requires-Python") or ""
        if not SpecifierSet(requires_python).contains(oldest):
            refused.append(f"{pin.name}=={spec.version} requires Python {requires_python}")
    assert not refused, f"pins that do not install on Python {oldest}: {refused}"


def test_tested_pythons_are_stated_and_checked():
    """The Makefile refuses an untested interpreter unless ANY_PYTHON is set; the README names the tested
    Pythons; environment.yml asks for the same minor version; pyproject admits it."""
    oldest = _oldest_tested_python()
    minor = ".".join(oldest.split(".")[:2])
    makefile = (ROOT / "Makefile").read_text()
    assert "$(call check_python," in makefile.split("$(STAMP): pyproject.toml constraints.txt", 1)[1].split("\n")[1]
    assert "ANY_PYTHON ?=" in makefile
    readme = (ROOT / "README.md").read_text()
    assert f"**Tested Pythons: {minor}**" in readme and oldest in readme
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert f"python={minor}" in environment["dependencies"]
    requires_python = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert SpecifierSet(requires_python).contains(oldest)


def test_constraints_pin_every_declared_dependency_within_its_range():
    """constraints.txt pins each declared package exactly, inside the declared range; torch is 2.13.0."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(requirement.name)] = spec.version
    assert pins["torch"] == "2.13.0"
    for name, specifier in _pyproject_requirements().items():
        assert name in pins, f"{name} is declared in pyproject.toml but not pinned in constraints.txt"
        assert Requirement(f"{name}{specifier}").specifier.contains(pins[name], prereleases=True), (name, pins[name])


def test_make_test_min_checks_the_oldest_torch_pyproject_allows():
    """`make test-min` installs the lowest torch release that pyproject.toml's range admits (its x.y.z with
    the declared x.y), so the declared minimum is the one checked; and fused's compile minimum lies above it."""
    (declared,) = Requirement(f"torch{_pyproject_requirements()['torch']}").specifier
    assert declared.operator == ">="
    match = re.search(r"^MIN_TORCH \?= torch==(\d+)\.(\d+)\.(\d+)$", (ROOT / "Makefile").read_text(), re.M)
    assert match, "the Makefile sets MIN_TORCH ?= torch==x.y.z"
    assert tuple(int(part) for part in declared.version.split(".")[:2]) == tuple(int(g) for g in match.groups()[:2])
    fused_source = (ROOT / "valueloss/fused.py").read_text()
    compile_minimum = re.search(r"^MIN_COMPILE_TORCH = \((\d+), (\d+)\)$", fused_source, re.M)
    assert compile_minimum and tuple(map(int, compile_minimum.groups())) >= tuple(map(int, match.groups()[:2]))


def test_readme_opens_with_the_two_commands_and_ci_calls_make_test():
    """The README starts with `make lab` and `make test`; .ci/run runs `make test` and the Makefile has both."""
    readme = (ROOT / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    assert [line.split("#")[0].strip() for line in first_block.strip().splitlines()] == ["make lab", "make test"]
    assert readme.index("make lab") < readme.index("## ")
    assert re.search(r"^make test$", (ROOT / ".ci/run").read_text(), re.M)
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^lab: ", makefile, re.M) and re.search(r"^test: ", makefile, re.M)
    assert "-c constraints.txt" in makefile


README_LIMIT = 10_000  # bytes: the front page fits on a screen or two; the rest lives in docs/
LINK = re.compile(r"\]\(([^)\s]+)\)|<img src=\"([^\"]+)\"")


def test_readme_is_short_and_every_docs_page_is_reachable():
    """README.md stays under 10 KB and links every docs/*.md page; every relative link and picture in the
    README and in docs/ points at a file of the repository."""
    readme = ROOT / "README.md"
    assert len(readme.read_bytes()) < README_LIMIT, f"README.md is {len(readme.read_bytes())} bytes"
    pages = sorted((ROOT / "docs").glob("*.md"))
    linked = {(ROOT / target).resolve() for target, _ in LINK.findall(readme.read_text()) if target}
    assert [page.name for page in pages if page.resolve() not in linked] == []
    for page in [readme, *pages]:
        for groups in LINK.findall(page.read_text()):
            target = (groups[0] or groups[1]).split("#")[0]
            if not target or re.match(r"^[a-z]+:", target):
                continue  # an anchor on the same page, or a web address
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links {target}, which does not exist"


def test_readme_quick_start_runs():
    """The README's Python quick start runs as written: the loss is a finite scalar with a gradient."""
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"## Quick start\n\n```python\n(.*?)```", readme, re.S).group(1)
    assert len(code.strip().splitlines()) <= 12
    namespace: dict = {}
    exec(compile(code, "README.md quick start", "exec"), namespace)
    loss, values = namespace["loss"], namespace["values"]
    assert loss.ndim == 0 and loss.isfinite() and values.grad is not None and values.grad.abs().sum() > 0


def test_readme_drop_in_table_is_valueloss_peers_table():
    """The README's drop-in table has one row per valueloss.peers.PEERS entry, with its settings and agreement."""
    from valueloss.peers import PEERS

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Drop-in replacement", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| Peer ")]
    expected = []
    for peer in PEERS.values():
        settings = ", ".join(f"{key}={value!r}" for key, value in peer.valueloss_settings.items())
        settings = f"`{settings}`" if settings else "defaults"
        expected.append(f"| {peer.name} | {settings}{' on `values[mask]`' if peer.flat else ''} | {peer.agreement} |")
    assert rows == expected


def test_packaging_files_exist():
    """The package is typed (py.typed shipped) and licensed."""
    assert (ROOT / "valueloss" / "py.typed").exists()
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "py.typed" in package_data["valueloss"]


def test_import_loads_only_the_core():
    """`import valueloss` loads torch and the core, but no subpackage, no torch._inductor or torch._dynamo,
    and no matplotlib, ipywidgets or gymnasium (checked in a fresh interpreter: the first stage of tests/fresh.py)."""
    result = fresh.stage("import valueloss")
    heavy = ("torch._inductor", "torch._dynamo", "matplotlib", "ipywidgets", "gymnasium", "valueloss.viz",
             "valueloss.lessons", "valueloss.batch", "valueloss.experiments")
    assert [m for m in heavy if m in result["modules"]] == []
    assert "torch" in result["modules"] and "valueloss.functional" in result["modules"]
    assert result["stdout"].splitlines() == [
        "['Recorder', 'Region', 'ValueLoss', 'ValueLossDiagnostics', '__version__', 'diagnose', 'functional']",
    ]


def test_core_modules_import_no_subpackage():
    """The core (valueloss/*.py) imports none of viz, lessons, batch or experiments: the arrows point down."""
    for path in sorted((ROOT / "valueloss").glob("*.py")):
        if path.name == "__main__.py":  # `python -m valueloss` is the command line, not the core
            continue
        source = path.read_text()
        for sub in ("viz", "lessons", "batch", "experiments"):
            assert not re.search(rf"^\s*(from|import)\s+(\.|valueloss\.){sub}\b", source, re.M), (path.name, sub)


TIERS = ("slow", "notebooks", "browser", "compile")


def test_tier_markers_are_registered_and_the_make_targets_select_them():
    """pyproject registers the four tier markers; make test runs all but slow and lists the ten slowest,
    make test-fast none of the four (and skips nbval) on the core's and the CLI's tests, make test-slow only slow."""
    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "--strict-markers" in options["addopts"]
    assert set(TIERS) <= {marker.split(":")[0] for marker in options["markers"]}
    makefile = (ROOT / "Makefile").read_text()

    def recipe(target):
        return re.search(rf"^{target}: .*?\n((?:\t.*\n)+)", makefile, re.M).group(1)

    assert '-m "not slow" --durations=10 tests valueloss notebooks' in recipe("test")
    assert '-p no:nbval -m "not (slow or notebooks or browser or compile)" $(FAST_TESTS)' in recipe("test-fast")
    fast = re.search(r"^FAST_TESTS := ((?:.*\\\n)*.*)$", makefile, re.M).group(1)
    core = {path.stem for path in (ROOT / "valueloss").glob("*.py") if not path.stem.startswith("_")}
    for name in core | {"batch", "cli"}:  # every core module's test file, and the batch report's and the CLI's
        assert f"tests/test_{name}.py" in fast, name
    assert "-m slow " in recipe("test-slow")


def test_conftest_marks_browser_tests_and_notebook_cells_by_path(request):
    """The root conftest marks tests/browser/* browser, notebooks/*.ipynb cells notebooks and valueloss/fused.py's
    doctests (they compile) compile, nothing else; and the items of this session carry those markers."""
    (conftest,) = [plugin for plugin in request.config.pluginmanager.get_plugins()
                   if getattr(plugin, "__file__", None) and Path(plugin.__file__) == ROOT / "conftest.py"]
    assert conftest.tier_markers(ROOT / "tests" / "browser" / "test_voila_app.py") == ["browser"]
    assert conftest.tier_markers(ROOT / "notebooks" / "00_start_here.ipynb") == ["notebooks"]
    assert conftest.tier_markers(ROOT / "tests" / "test_notebooks.py") == []
    assert conftest.tier_markers(ROOT / "valueloss" / "loss.py", doctest=True) == []
    assert conftest.tier_markers(ROOT / "valueloss" / "fused.py", doctest=True) == ["compile"]
    assert conftest.tier_markers(ROOT / "valueloss" / "fused.py") == []
    for item in request.session.items:
        expected = set(conftest.tier_markers(Path(item.path), doctest=isinstance(item, pytest.DoctestItem)))
        assert expected <= {marker.name for marker in item.iter_markers()}, item.nodeid
