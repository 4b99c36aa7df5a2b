# ruff: noqa: E501  (a table of code snippets)
"""Small mutation run for the CLI side (not collected by pytest; run by hand when these tests change).

    python tests/pipelines/mutation.py [--only SUBSTRING]

Copies the working tree to a temp dir (the shared checkout is never modified), then for each mutation
below replaces one snippet in one file, runs the named tests with `-x`, and reports "killed" (a test
failed) or "SURVIVED". Exit status 1 when a mutation survives or a snippet is not found (stale list).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.mutation_runner import main  # noqa: E402

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
    # check_range (attn_spec: the one range check of every option) and the declared ranges
    ("attn_spec/__init__.py", "if value != value or (lo", "if (lo", SPEC + " -k nan"),
    (
        "attn_spec/__init__.py",
        "        lo_bad = self.lo is not None and (value <= self.lo if",
        "        lo_bad = self.lo is not None and (value < self.lo if",
        P + "test_options.py",
    ),
    (
        "attn_spec/__init__.py",
        "            object.__setattr__(obj, name, value)",
        "            pass",
        P + "test_options.py",
    ),
    (
        "attn_spec/__init__.py",
        "        if value is None and optional:\n            continue",
        "        if optional:\n            continue",
        P + "test_options.py",
    ),
    # layout flags, families on the adapters
    (
        "attn_pipelines/config.py",
        "all(math.isfinite(c) and 0.0 <= c <= 1.0 for c in box)",
        "all(0.0 <= c for c in box)",
        P + "test_layout_flags.py -k 'not slow'",
    ),
    (
        "attn_pipelines/config.py",
        "(x0 * width, y0 * height, x1 * width, y1 * height)",
        "(x0 * height, y0 * width, x1 * height, y1 * width)",
        P + "test_layout_flags.py -k pixels",
    ),
    ("attn_pipelines/config.py", "        if clash:\n", "        if False:\n", P + "test_layout_flags.py -k override"),
    (
        "attn_pipelines/commands/generate.py",
        "    return fps if fps is not None else 16",
        "    return 16",
        P + "test_families.py",
    ),
    (
        "attn_pipelines/commands/show_mask.py",
        "        text_first = diffusion_attn.ADAPTERS[args.family].text_first",
        "        text_first = False",
        P + "test_families.py -k one_adapter_file",
    ),
    (
        "diffusion_attn/variants/base.py",
        "            missing = [k for k in missing if k not in self.family_optional]",
        "            missing = []",
        P + "test_families.py",
    ),
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
    (
        "attn_pipelines/io.py",
        "        frames = iio.count_frames_and_secs(str(path))[0]\n",
        "        frames = len(arr)\n",
        GEN + " -k failed_write",
    ),
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
    (
        "diffusion_attn/adapters/latent.py",
        "(frames - 1) // rule.vae_t + 1",
        "frames // rule.vae_t",
        GEN + " -k before_loading",
    ),
    (
        "attn_pipelines/latent.py",
        "            elif isinstance(v, Neighborhood):",
        "            elif False:",
        CFG + " -k check_fit",
    ),
    (
        "diffusion_attn/adapters/ltx_video.py",
        "LatentRule(video=True, vae_t=8, vae_s=32, patch_t=1, patch=1)",
        "LatentRule(video=True, vae_t=8, vae_s=16, patch_t=1, patch=1)",
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

if __name__ == "__main__":
    raise SystemExit(main(MUTATIONS, __doc__))
