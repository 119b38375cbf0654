"""Packaging facts users rely on: the version written once, py.typed shipped, and the
``[sam]`` extra naming exactly what the SAM example needs, satisfied by what is installed."""

import ast
import sys
from importlib import metadata
from pathlib import Path

import pytest

import lora_fused

tomllib = pytest.importorskip("tomllib")
from packaging.requirements import Requirement  # noqa: E402
from packaging.utils import canonicalize_name  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
EXAMPLE = REPO_ROOT / "examples" / "sam_polyp"
# segment-anything declares no dependencies, yet the parts the example uses import torchvision
# (ResizeLongestSide, the mask decoder's box utilities), so the extra carries it.
NEEDED_BY_SEGMENT_ANYTHING = {"torchvision"}


def test_the_version_is_written_once_and_setuptools_reads_it_from_the_package():
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "lora_fused.__version__"}
    read_attr = pytest.importorskip("setuptools.config.expand").read_attr
    assert read_attr("lora_fused.__version__", {}, str(REPO_ROOT)) == lora_fused.__version__
    written = [path for path in (REPO_ROOT / "lora_fused").glob("*.py")
               if f'"{lora_fused.__version__}"' in path.read_text()]
    assert written == [REPO_ROOT / "lora_fused" / "__init__.py"]


def test_py_typed_is_in_the_package_and_its_package_data():
    assert (REPO_ROOT / "lora_fused" / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["lora_fused"]


def _third_party_imports(folder: Path) -> set[str]:
    names = set()
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {name for name in names if name not in sys.stdlib_module_names and name not in ("lora_fused", "examples")}


def _names(requirements) -> dict[str, Requirement]:
    parsed = [Requirement(text) for text in requirements]
    return {canonicalize_name(r.name): r for r in parsed}


def test_the_sam_extra_names_what_the_example_imports_and_what_is_installed_satisfies_it():
    distributions = metadata.packages_distributions()
    missing = sorted(name for name in _third_party_imports(EXAMPLE) if name not in distributions)
    assert not missing, f"the example imports {missing}, which no installed distribution provides"
    imported = {canonicalize_name(distributions[name][0]) for name in _third_party_imports(EXAMPLE)}
    core = set(_names(PYPROJECT["project"]["dependencies"]))
    sam = _names(PYPROJECT["project"]["optional-dependencies"]["sam"])
    assert set(sam) == (imported - core) | NEEDED_BY_SEGMENT_ANYTHING
    for name, requirement in {**sam, **_names(PYPROJECT["project"]["dependencies"])}.items():
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        installed = metadata.version(name)
        assert requirement.specifier.contains(installed, prereleases=True), (
            f"installed {name} {installed} does not satisfy {requirement}")
