"""Checks of the project itself: declared dependencies stay in sync, set-up commands, import hygiene."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

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


def test_packaging_files_exist():
    """The package is typed (py.typed shipped) and licensed."""
    assert (ROOT / "valueloss" / "py.typed").exists()
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "py.typed" in package_data["valueloss"]


def test_import_loads_only_the_core():
    """`import valueloss` loads torch and the core, but no subpackage, no torch._inductor or torch._dynamo,
    and no matplotlib or ipywidgets (checked in a fresh interpreter)."""
    code = (
        "import sys, valueloss\n"
        "from valueloss import ValueLoss, ValueLossDiagnostics, Region, diagnose, functional\n"
        "ValueLoss(0.2)\n"
        "heavy = ('torch._inductor', 'torch._dynamo', 'matplotlib', 'ipywidgets', 'valueloss.viz', 'valueloss.lessons',\n"
        "         'valueloss.batch', 'valueloss.experiments')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
        "print(sorted(valueloss.__all__))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.splitlines() == [
        "[]",
        "['Region', 'ValueLoss', 'ValueLossDiagnostics', '__version__', 'diagnose', 'functional']",
    ]


def test_core_modules_import_no_subpackage():
    """The core (valueloss/*.py) imports none of viz, lessons, batch or experiments: the arrows point down."""
    for path in sorted((ROOT / "valueloss").glob("*.py")):
        if path.name == "__main__.py":  # `python -m valueloss` is the command line, not the core
            continue
        source = path.read_text()
        for sub in ("viz", "lessons", "batch", "experiments"):
            assert not re.search(rf"^\s*(from|import)\s+(\.|valueloss\.){sub}\b", source, re.M), (path.name, sub)
