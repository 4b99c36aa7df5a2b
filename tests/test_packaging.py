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
    mapped = {"attn_pipelines.configs", "attn_pipelines.assets"}  # package-dir: configs/ and assets/
    found |= mapped
    assert found <= listed, f"packages missing from pyproject [tool.setuptools].packages: {sorted(found - listed)}"
    assert listed <= found, f"listed but absent: {sorted(listed - found)}"
    assert set(_pyproject()["tool"]["setuptools"]["package-dir"]) == mapped


def test_world_dir_comes_from_the_installed_package_data_never_the_checkout(tmp_path, monkeypatch):
    """`world_dir()`: $ATTNPLUG_WORLD_DIR, else the package data `attn_pipelines.assets/world` wherever the
    package is installed, else a clear error; the embedded default then falls back instead of crashing."""
    from attn_pipelines import tiny
    from attn_pipelines.cli import main
    from attn_pipelines.world import models

    monkeypatch.delenv("ATTNPLUG_WORLD_DIR", raising=False)
    fake = tmp_path / "site" / "fake_attnplug_assets"  # an installed package data folder elsewhere
    (fake / "world" / "t2v" / "transformer").mkdir(parents=True)
    (fake / "world" / "t2v" / "model_index.json").write_text("{}")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(models, "ASSETS_PACKAGE", "fake_attnplug_assets")
    assert models.world_dir() == fake / "world"
    assert tiny.world_t2v_dir() == fake / "world" / "t2v"
    monkeypatch.setenv("ATTNPLUG_WORLD_DIR", str(tmp_path / "mine"))
    assert models.world_dir() == tmp_path / "mine"  # the variable wins
    monkeypatch.delenv("ATTNPLUG_WORLD_DIR")
    monkeypatch.setattr(models, "ASSETS_PACKAGE", "attn_pipelines.no_such_assets")
    with pytest.raises(models.WorldAssetsMissing, match="ATTNPLUG_WORLD_DIR"):
        models.world_dir()
    assert tiny.world_t2v_dir() is None  # `attnplug generate` says it uses the untrained tiny pipeline
    assert main(["eval", "--smoke", "--out", str(tmp_path / "o")]) == 2  # one clear error line, exit 2


def test_package_sources_never_locate_the_checkout():
    """No module of the installed package finds files relative to its own source location's parents (a checkout):
    shipped data is package data, a checkout's folders (benchmarks/) are named by the user or the working dir."""
    bad = [
        f"{p.relative_to(ROOT)}:{i}"
        for top in PACKAGES
        for p in (ROOT / top).rglob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if re.search(r"__file__\)?\.resolve\(\)\.parents\[", line)
        and p.relative_to(ROOT).as_posix() not in _CHECKOUT_READERS
    ]
    assert not bad, f"modules that read the source checkout: {bad}"


#: in progress by another engineer when this test was written (untracked then): its defaults name the checkout's
#: benchmarks/results and assets/world/lora, which the CLI options of that script can override
_CHECKOUT_READERS = {"attn_pipelines/world/lora_length.py"}


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


# ----------------------------------------------------------------------------------------------
# docs/*.md, README.md and pyproject.toml refer only to files that exist in the repository
# ----------------------------------------------------------------------------------------------
DOC_FILES = ["README.md", "pyproject.toml", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
_EXT = r"(?:py|md|yaml|yml|json|png|gif|mp4|toml|sh|txt|cfg|ini|safetensors|whl)"
_TOKEN = re.compile(rf"(?<![\w/.~@:-])((?:[\w.{{}},<>*-]+/)+[\w.{{}},<>*-]*|[\w-]+(?:\.[\w-]+)*\.{_EXT})(?![\w/])")
#: outputs the docs show being written and the user's own data: not files of the repository
GENERATED = {"mask.png", "out/attnplug.mp4", "fox.mp4", "clip.mp4", "small.gif", "x.png", "build/", "dist/"}
GENERATED |= {"./imagefolder"}
#: docs/long-video.md: a user's clips and the files `attnplug train-lora` writes
GENERATED |= {"beach_0001.mp4", "beach_0001.txt", "city_0002.txt", "beach.mp4", "generate_long.py"}
GENERATED |= {"pytorch_lora_weights.safetensors", "train_config.json"}
#: written beside a model's weights by handle.save_pretrained / save_pretrained while applied
GENERATED |= {"attnplug_config.json"}
#: docs/world.md: what the world's re-training commands write under the user's runs/ folder
GENERATED |= {"runs/world/t2v2/accuracy.json"}
#: references to files that should exist but do not yet: each entry must still be missing (remove it when added)
KNOWN_MISSING = {
    "benchmarks/results/digits_agent.json": "README.md: 'digits figures in' (vision owner; results not committed yet)",
}


def _expand(token: str) -> list[str]:
    """`a/{b,c}.py` -> a/b.py, a/c.py; `<family>` -> `*`."""
    m = re.search(r"\{([^{}]*)\}", token)
    if m:
        return [x for alt in m[1].split(",") for x in _expand(token[: m.start()] + alt + token[m.end() :])]
    return [re.sub(r"<[^<>]*>", "*", token)]


def _exists(path: str, doc: Path) -> bool:
    path = path.rstrip("/.,")
    if "/" not in path:  # a bare file name: anywhere in the repository
        return any(p for p in ROOT.rglob(path) if ".git" not in p.parts)
    for base in (ROOT, doc.parent):
        if any(base.glob(path)) if "*" in path else (base / path).exists():
            return True
    return False


def _references(doc: Path) -> set[str]:
    text = re.sub(r"\w+://\S+", "", doc.read_text())  # URLs
    refs = set()
    for token in _TOKEN.findall(text):
        first = token.split("/")[0]
        external = "/" in token and not (ROOT / first).exists() and first not in ("docs", "out", "build", "dist")
        if external and not re.search(rf"\.{_EXT}$", token):
            continue  # a Hub id or a GitHub owner/repo (Wan-AI/Wan2.1-T2V-14B-Diffusers)
        refs.add(token)
    return refs


@pytest.mark.parametrize("doc", DOC_FILES)
def test_docs_refer_only_to_files_in_the_repository(doc):
    path = ROOT / doc
    refs = _references(path)
    assert refs, f"{doc}: no file references found (the scanner is broken)"
    missing = sorted(
        r
        for r in refs
        if r not in GENERATED and r not in KNOWN_MISSING and not all(_exists(x, path) for x in _expand(r))
    )
    assert not missing, f"{doc} refers to files that are not in the repository: {missing}"


def test_known_missing_references_are_still_missing():
    for ref in KNOWN_MISSING:
        assert not (ROOT / ref).exists(), f"{ref} exists now: remove it from KNOWN_MISSING"


def test_the_doc_scanner_finds_missing_files(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text(
        "See `attn_pipelines/nope.py`, ARCHITECTURE.md and `docs/{kernels,gone}.md`; Wan-AI/Wan2.1 is a Hub id."
    )
    refs = _references(doc)
    assert refs == {"attn_pipelines/nope.py", "ARCHITECTURE.md", "docs/{kernels,gone}.md"}
    assert [r for r in sorted(refs) if all(_exists(x, doc) for x in _expand(r))] == []


# ----------------------------------------------------------------------------------------------
# `attnplug bench` runs after the main install: its scripts import only main dependencies
# ----------------------------------------------------------------------------------------------
def test_bench_scripts_need_only_the_main_install():
    from attn_pipelines.commands.bench import BENCH_SCRIPTS

    main_deps = {re.split(r"[ <>=!~;\[]", r, maxsplit=1)[0].lower() for r in _pyproject()["project"]["dependencies"]}
    main_deps |= {
        re.split(r"[ <>=!~;\[]", r, maxsplit=1)[0].lower()
        for r in _pyproject()["project"]["optional-dependencies"]["video"]
    }
    dist_of = md.packages_distributions()
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    missing = {}
    for name in BENCH_SCRIPTS:
        for mod in _imports(ROOT / "benchmarks" / f"{name}.py") - stdlib - set(PACKAGES) - OPTIONAL:
            dists = {d.lower().replace("_", "-") for d in dist_of.get(mod, [mod])}
            if not dists & main_deps:
                missing.setdefault(mod, []).append(name)
    assert not missing, f"`attnplug bench` scripts import packages outside the main install: {missing}"
