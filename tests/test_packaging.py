"""Repository hygiene: CI runs the README's command, the wheel lists every package, and every
third-party module the code imports is declared in pyproject.toml."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("attn_spec", "attn_kernels", "diffusion_attn", "vision_attn", "attn_pipelines")

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _readme_command(label: str) -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"<!-- {label} -->\s*```(?:bash|sh)?\n(.+?)\n```", text, re.S)
    assert m, f"README.md has no fenced command after <!-- {label} -->"
    return m.group(1).strip()


def test_ci_runs_exactly_the_readme_test_command():
    cmd = _readme_command("test-command")
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1].strip() == cmd, f".ci/run last line {ci[-1]!r} != README test command {cmd!r}"
    assert "pytest" in cmd


def test_readme_main_job_runs_generate_without_download():
    cmd = _readme_command("main-command")
    assert "attnplug generate" in cmd and "--model" not in cmd


def test_wheel_package_list_covers_the_tree():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for top in PACKAGES
        for p in (ROOT / top).rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    found.add("attn_pipelines.configs")
    assert found <= listed, f"packages missing from pyproject [tool.setuptools].packages: {sorted(found - listed)}"
    assert listed <= found | {"attn_pipelines.configs"}, f"listed but absent: {sorted(listed - found)}"


def _declared() -> set[str]:
    proj = _pyproject()["project"]
    reqs = list(proj["dependencies"]) + [r for extra in proj["optional-dependencies"].values() for r in extra]
    return {re.split(r"[ <>=!~;\[]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


# Imported only inside guarded optional code paths, with a clear message when missing.
OPTIONAL = {"natten", "xformers"}


def test_every_imported_package_is_declared():
    declared = _declared()
    dist_of = md.packages_distributions()
    stdlib = set(sys.stdlib_module_names)
    ours = set(PACKAGES)
    missing = {}
    for top in PACKAGES:
        for path in (ROOT / top).rglob("*.py"):
            for name in _imports(path):
                if name in stdlib or name in ours or name in OPTIONAL or name == "__future__":
                    continue
                dists = {d.lower().replace("_", "-") for d in dist_of.get(name, [name])}
                if not dists & declared:
                    missing.setdefault(name, []).append(str(path.relative_to(ROOT)))
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


# Imports flow downward (docs/architecture.md): a package may import only those listed for it.
ALLOWED_OURS = {
    "attn_spec": set(),
    "attn_kernels": set(),
    "diffusion_attn": {"attn_kernels", "attn_spec"},
    "vision_attn": {"attn_kernels", "attn_spec"},
    "attn_pipelines": {"attn_kernels", "attn_spec", "diffusion_attn", "vision_attn"},
}


def test_imports_flow_downward():
    bad = []
    for top, allowed in ALLOWED_OURS.items():
        for path in (ROOT / top).rglob("*.py"):
            for name in _imports(path) & set(PACKAGES) - {top} - allowed:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, bad
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    assert all(_imports(p) <= stdlib for p in (ROOT / "attn_spec").rglob("*.py")), "attn_spec is stdlib-only"
