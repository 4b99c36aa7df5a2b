"""Small mutation run for the CLI side (not collected by pytest; run by hand when these tests change).

    python tests/pipelines/mutation.py [--only SUBSTRING]

Copies the working tree to a temp dir (the shared checkout is never modified), then for each mutation
below replaces one snippet in one file, runs the named tests with `-x`, and reports "killed" (a test
failed) or "SURVIVED". Exit status 1 when a mutation survives or a snippet is not found (stale list).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
P = "tests/pipelines/"
GEN, CMD, CFG, SPEC = P + "test_cli_generate.py", P + "test_cli_commands.py", P + "test_config.py", P + "test_spec.py"
MASK = CMD + " -k 'show_mask or pair_mask or render'"

# (file, old snippet, new snippet, pytest arguments)
MUTATIONS: list[tuple[str, str, str, str]] = [
    # attn_spec
    ("attn_spec/__init__.py", '"true": True,', '"true": False,', SPEC),
    (
        "attn_spec/__init__.py",
        "if isinstance(value, int) and not isinstance(value, bool):",
        "if isinstance(value, int):",
        SPEC,
    ),
    ("attn_spec/__init__.py", 'elif ch == "," and depth == 0:', 'elif ch == ",":', SPEC),
    ("attn_spec/__init__.py", "    if unknown:\n", "    if False:\n", SPEC),
    ("attn_spec/__init__.py", "raise seq_errors[0] if len(seq_errors) == 1 else fail", "raise fail", SPEC),
    ("attn_spec/__init__.py", "return list(out) if (origin or tp) is list else tuple(out)", "return list(out)", SPEC),
    # diffusion_attn check_range (the one shared edit)
    ("diffusion_attn/variants/base.py", "if value != value or (lo", "if (lo", SPEC + " -k nan"),
    # config
    ("attn_pipelines/config.py", '"seed": (0, MAX_SEED),', '"seed": (0, math.inf),', CFG + " -k schema"),
    (
        "attn_pipelines/config.py",
        "if name not in data and f.default is MISSING",
        "if False and f.default is MISSING",
        CFG,
    ),
    ("attn_pipelines/config.py", "                missing.append(spec.name)", "                pass", CFG),
    (
        "attn_pipelines/config.py",
        "out.setdefault(spec.name, {}).update(spec.options)",
        "out.setdefault(spec.name, dict(spec.options))",
        CFG,
    ),
    ("attn_pipelines/config.py", "parse_value(v) if isinstance(v, str) else v", "v", CFG),
    (
        "attn_pipelines/config.py",
        "            build_variant(spec, where=where, registry=registry)\n",
        "            pass\n",
        CFG,
    ),
    # io
    ("attn_pipelines/io.py", "        if self.path.is_dir():\n", "        if False:\n", GEN + " -k before_loading"),
    (
        "attn_pipelines/io.py",
        "            tmp.unlink(missing_ok=True)\n",
        "            pass\n",
        GEN + " -k failed_write",
    ),
    ("attn_pipelines/io.py", "    if res.returncode != 0:\n", "    if False:\n", GEN + " -k failed_write"),
    ("attn_pipelines/io.py", "            fn(tmp)\n", "            fn(self.path)\n", GEN + " -k failed_write"),
    # (dropping ffmpeg's +bitexact flags is an equivalent mutant with one ffmpeg build: output stays identical)
    # tiny, callbacks
    ("attn_pipelines/tiny.py", "            component.eval()\n", "            pass\n", P + "test_tiny.py"),
    (
        "attn_pipelines/callbacks.py",
        "            if torch.compiler.is_compiling():",
        "            if False:",
        P + "test_callbacks.py -k compile",
    ),
    # latent, loading
    ("attn_pipelines/latent.py", "(frames - 1) // rule.vae_t + 1", "frames // rule.vae_t", GEN + " -k before_loading"),
    (
        "attn_pipelines/latent.py",
        "            elif isinstance(v, diffusion_attn.Neighborhood):",
        "            elif False:",
        CFG + " -k check_fit",
    ),
    (
        "attn_pipelines/latent.py",
        '"ltx_video": LatentRule(True, 8, 32, 1, 1)',
        '"ltx_video": LatentRule(True, 8, 16, 1, 1)',
        CFG + " -k 'runnable or token_grids'",
    ),
    (
        "attn_pipelines/loading.py",
        'return "dtype" if hasattr',
        'return "torch_dtype" if not hasattr',
        GEN + " -k subprocess_video",
    ),
    (
        "attn_pipelines/loading.py",
        'return ModelInfo(pipeline=index.get("_class_name"), family=family',
        "return ModelInfo(pipeline=None, family=None",
        GEN + " -k before_loading",
    ),
    # maskdraw, show-mask
    ("attn_pipelines/maskdraw.py", "torch.argsort(perm.cpu().long())", "perm.cpu().long()", MASK),
    ("attn_pipelines/maskdraw.py", "((word >> (c % 32)) & 1)", "((word >> (c % 31)) & 1)", MASK),
    (
        "attn_pipelines/maskdraw.py",
        "            if plan.layout is not None:\n                return s, lay, plan",
        "            if True:\n                return s, lay, plan",
        CMD + " -k show_mask",
    ),
    ("attn_pipelines/maskdraw.py", "    s = min(f, _SAMPLES)", "    s = 1", MASK),
    ("attn_pipelines/commands/show_mask.py", "    if n > MAX_TOKENS:", "    if False:", CMD + " -k show_mask_errors"),
    ("attn_pipelines/commands/show_mask.py", "text_first=bool(text_first)", "text_first=False", MASK),
    # generate
    (
        "attn_pipelines/commands/generate.py",
        "    flt = _DropMessages(needles)",
        "    flt = _DropMessages([])",
        GEN + " -k 'warns_once or subprocess_video'",
    ),
    (
        "attn_pipelines/commands/generate.py",
        "            if opts.get(key, 0) is None:",
        "            if False:",
        GEN + " -k resolved_values",
    ),
    ("attn_pipelines/commands/generate.py", "manual_seed(s.seed)", "manual_seed(0)", GEN + " -k seed"),
    (
        "attn_pipelines/commands/generate.py",
        "        s.target.check()\n",
        "        pass\n",
        GEN + " -k 'before_loading or one_line'",
    ),
    (
        "attn_pipelines/commands/generate.py",
        "        if png and args.frames is None:\n            print(",
        "        if False:\n            print(",
        GEN + " -k switching",
    ),
    (
        "attn_pipelines/commands/generate.py",
        "            handle.prepare(*args, **kwargs)",
        "            pass",
        GEN + " -k compile",
    ),
    (
        "attn_pipelines/commands/generate.py",
        "preset.family != family:",
        "preset.family == 'nope':",
        GEN + " -k before_loading",
    ),
    (
        "attn_pipelines/commands/generate.py",
        "        _check_variants_fit(variants, family, grid, s, where)",
        "        pass",
        GEN + " -k before_loading",
    ),
    (
        "attn_pipelines/commands/generate.py",
        "        if reason and reason not in warned:",
        "        if False:",
        GEN + " -k warns_once",
    ),
    (
        "attn_pipelines/commands/generate.py",
        '        raise CLIError(f"--device {name!r}: expected cpu',
        '        print(f"--device {name!r}: expected cpu',
        GEN + " -k one_line",
    ),
    # bench, list, cli
    (
        "attn_pipelines/commands/bench.py",
        '                failed.append(f"{n} (exit status {rc})")',
        "                pass",
        CMD + " -k bench",
    ),
    (
        "attn_pipelines/commands/bench.py",
        'return Path(tempfile.mkdtemp(prefix="attnplug-bench-smoke-"))',
        "return results",
        CMD + " -k bench",
    ),
    (
        "attn_pipelines/commands/bench.py",
        '"cpu_reference_bench": "cpu_reference",',
        '"cpu_reference_bench": "cpu_reference_bench",',
        CMD + " -k bench",
    ),
    ("attn_pipelines/commands/listing.py", "    _print_variants(vision_variants())", "    pass", CMD + " -k list"),
    (
        "attn_pipelines/commands/listing.py",
        'status = f"  [{preset_status(p)}]" if not p.usable else ""',
        'status = ""',
        CMD + " -k list",
    ),
    (
        "attn_pipelines/cli.py",
        '    except RunError as e:\n        print(f"attnplug: error: {e}", file=sys.stderr)\n        return 1',
        '    except RunError as e:\n        print(f"attnplug: error: {e}", file=sys.stderr)\n        return 2',
        CMD + " -k bench",
    ),
    ("attn_pipelines/cli.py", "    p = _Parser(", "    p = argparse.ArgumentParser(", GEN + " -k one_line"),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help="run the mutations whose file or snippet contains this")
    args = ap.parse_args()
    todo = [m for m in MUTATIONS if args.only is None or any(args.only in x for x in m[:3])]
    work = Path(tempfile.mkdtemp(prefix="attnplug-mut-"))
    src = work / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "out", "results"))
    shutil.copytree(ROOT / "benchmarks" / "results", src / "benchmarks" / "results")
    survived, stale = [], []
    for i, (rel, old, new, tests) in enumerate(todo, 1):
        path = src / rel
        text = path.read_text()
        if text.count(old) != 1:
            stale.append(f"{rel}: {old!r}")
            print(f"[{i}/{len(todo)}] STALE  {rel}: {old[:60]!r}", flush=True)
            continue
        path.write_text(text.replace(old, new))
        t0 = time.time()
        cmd = f"{sys.executable} -m pytest -x -q -p no:cacheprovider {tests}"
        r = subprocess.run(cmd, shell=True, cwd=src, capture_output=True, text=True)
        path.write_text(text)
        verdict = "killed" if r.returncode == 1 else ("SURVIVED" if r.returncode == 0 else f"rc={r.returncode}")
        if r.returncode != 1:
            survived.append(f"{rel}: {old[:60]!r} -> {new[:40]!r} ({verdict})")
        print(f"[{i}/{len(todo)}] {verdict:8} {time.time() - t0:5.0f}s  {rel}: {old[:60]!r}", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    done = len(todo) - len(stale)
    print(f"\n{done - len(survived)} of {done} mutations killed; {len(stale)} stale")
    for line in survived + stale:
        print("  " + line)
    return 1 if survived or stale else 0


if __name__ == "__main__":
    sys.exit(main())
