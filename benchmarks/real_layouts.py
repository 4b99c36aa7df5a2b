"""Every variant's layout at the official checkpoints' real sizes, built on the CPU: time, memory, density.

For each entry of `diffusion_attn.checkpoints.CHECKPOINTS` at its default size (and the sizes the
papers use), the host-side work a variant does at its first sparse call:

* radial: the official setting where one exists (Wan2.1, HunyuanVideo), else HunyuanVideo's
  (decay 0.95, no sink: what configs/cogvideox-5b-radial.yaml uses);
* gna: the GNA paper's / NATTEN docs' configurations (HunyuanVideo 30 x 48 x 80: window 18 x 24 x 24,
  stride 16 x 8 x 8; FLUX 4K 256 x 256: window 80 x 80, stride 16 x 16); other video entries get the
  HunyuanVideo window and stride clipped to their grid (no published setting for them);
* lite: LiteAttention's initial layout (the warm-up call visits every allowed tile) and its skip state,
  bool [batch, heads, blocks, blocks] per layer and CFG branch;
* ultravico: the positions and logit decay (HunyuanVideo: plus its beta band layouts) at 2x and 4x
  the trained length;
* regional: two entities (left / right halves) on FLUX, SD3 and Wan text-to-video (Wan: its
  cross-attention layout over [entities, prompt] keys).

Memory is the bytes of the tensors the variant keeps (layout lists, element masks, kernel views,
permutations, positions, skip state), counted once per storage; time is wall-clock on this machine.
Densities: block density (visited block pairs / all) and token density (visited token pairs / N^2,
element masks included, computed from the lists, never an N x N mask).

    python benchmarks/real_layouts.py                # writes benchmarks/results/real_layouts.{json,png}
    python benchmarks/real_layouts.py --only hunyuanvideo --variants gna
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from diffusion_attn.checkpoints import CHECKPOINTS, Checkpoint  # noqa: E402
from diffusion_attn.variants import LiteAttention, Neighborhood, Radial, Regional, UltraViCo  # noqa: E402
from diffusion_attn.variants.base import AttnContext, AttnPlan, TokenLayout  # noqa: E402

#: (grid, window, stride) published by the GNA paper / NATTEN docs, with their sparsity
GNA_PUBLISHED = {
    (30, 48, 80): ((18, 24, 24), (16, 8, 8), "NATTEN docs / GNA paper, HunyuanVideo: ~91% sparsity"),
    (1, 256, 256): ((1, 80, 80), (1, 16, 16), "NATTEN docs / GNA paper, FLUX.1-dev 4K: ~90% sparsity"),
}
HUNYUAN_GNA = ((18, 24, 24), (16, 8, 8))
#: (entry, size) pairs measured; the paper grids first
RUNS = [
    ("hunyuanvideo", "gna-paper"),
    ("hunyuanvideo", "default"),
    ("wan2.1-t2v-1.3b", "default"),
    ("wan2.1-t2v-14b", "default"),
    ("wan2.2-ti2v-5b", "default"),
    ("cogvideox-5b", "default"),
    ("cogvideox1.5-5b", "default"),
    ("ltx-video-0.9.x-2b", "default"),
    ("flux.1-dev", "default"),
    ("flux.1-dev", "2048"),
    ("flux.1-dev", "4096"),
    ("sd3.5-medium", "default"),
]


def tensor_bytes(*objs: Any) -> int:
    """Bytes of every tensor reachable from `objs` (attributes, tuples, lists, dicts), each storage once."""
    seen: set = set()
    total = 0
    stack = list(objs)
    visited: set = set()
    while stack:
        o = stack.pop()
        if isinstance(o, torch.Tensor):
            key = (o.untyped_storage().data_ptr(), o.untyped_storage().nbytes())
            if key not in seen:
                seen.add(key)
                total += o.untyped_storage().nbytes()
        elif isinstance(o, (list, tuple, set)):
            stack.extend(o)
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif hasattr(o, "__dict__") and id(o) not in visited and not isinstance(o, type):
            visited.add(id(o))
            stack.extend(vars(o).values())
    return total


def _popcount(words: torch.Tensor) -> int:
    """Set bits of int32 words (SWAR popcount on int64)."""
    x = words.to(torch.int64) & 0xFFFFFFFF
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    x = (x * 0x01010101) & 0xFFFFFFFF
    return int((x >> 24).sum())


def densities(bl: Any) -> dict[str, float]:
    """Block and token density of a BlockLayout (token pairs counted from the lists and element masks)."""
    rp, ci = bl.row_ptr.cpu().long(), bl.col_idx.cpu().long()
    nqb, nkb, bq, bk = bl.num_q_blocks, bl.num_k_blocks, bl.block_q, bl.block_k
    rows = torch.repeat_interleave(torch.arange(rp.numel() - 1), rp[1:] - rp[:-1]) % nqb
    q_valid = (bl.q_len - rows * bq).clamp(max=bq)
    k_valid = (bl.k_len - ci * bk).clamp(max=bk)
    area = q_valid * k_valid
    total = int(area.sum())
    if bl.partial is not None:
        part = bl.partial.cpu().long()
        sel = part >= 0
        total -= int(area[sel].sum())
        total += _popcount(bl.elem_mask.cpu()[part[sel]])
    groups = bl.batch * bl.heads
    return {
        "block_density": float(bl.nnz / (groups * nqb * nkb)),
        "token_density": total / (groups * bl.q_len * bl.k_len),
    }


def _ctx(layout: TokenLayout, c: Checkpoint, step: int = 0, layer: int = 0, state: dict | None = None) -> AttnContext:
    return AttnContext(
        layer=layer, num_layers=c.num_layers, step=step, timestep=None, layout=layout, batch=1, heads=c.heads,
        head_dim=c.head_dim, device=torch.device("cpu"), dtype=torch.bfloat16, state={} if state is None else state,
        num_steps=50,
    )  # fmt: skip


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def _record(rows: list, c: Checkpoint, size: str, layout: TokenLayout, variant: str, setting: str, seconds: float,
            nbytes: int, dens: dict | None, **extra: Any) -> None:  # fmt: skip
    row = {
        "entry": c.name, "size": size, "grid": list(layout.grid), "tokens": layout.seq_len, "variant": variant,
        "setting": setting, "build_s": round(seconds, 3), "bytes": nbytes, "peak_rss_gb": round(_rss_gb(), 2),
        **(dens or {}), **extra,
    }  # fmt: skip
    rows.append(row)
    d = "" if not dens else f" block {dens['block_density']:.4f} token {dens['token_density']:.4f}"
    print(
        f"{c.name:20s} {size:10s} {variant:10s} {setting:38s} {seconds:8.2f}s {nbytes / 2**20:9.1f} MiB{d}", flush=True
    )


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def run_radial(rows, c, size, layout):
    fam = c.family
    if fam in ("wan", "hunyuan_video"):
        var, setting = Radial(), "official (" + ("decay 0.2, sink" if fam == "wan" else "decay 0.95") + ")"
    else:
        var = Radial(decay_factor=0.95, dense_steps=12, dense_layers=0, attention_sink=False)
        setting = "HunyuanVideo's (decay 0.95, no sink)"
    cfg = var.resolved(fam)
    ctx = _ctx(layout, c, step=cfg["dense_steps"], layer=cfg["dense_layers"])
    plan, s = _timed(lambda: var.plan(ctx, AttnPlan()))
    _record(rows, c, size, layout, "radial", setting, s, tensor_bytes(plan.layout, plan.perm, plan.inv),
            densities(plan.layout))  # fmt: skip


def run_gna(rows, c, size, layout, *, na: bool = False):
    grid = layout.grid
    if grid in GNA_PUBLISHED:
        window, stride, setting = GNA_PUBLISHED[grid]
    else:  # HunyuanVideo's window as fractions of its grid (0.6, 0.5, 0.3) and its stride / window ratios
        (kh, sh), hg = HUNYUAN_GNA, (30, 48, 80)
        window = tuple(max(1, min(g, round(g * k / h))) for g, k, h in zip(grid, kh, hg))
        stride = tuple(max(1, min(w, round(w * s / k))) for w, s, k in zip(window, sh, kh))
        setting = "scaled from HunyuanVideo's"
    if na:
        stride, setting = (1, 1, 1), setting.split(":")[0] + ": NA (stride 1)"
    var = Neighborhood(kernel_size=window, stride=stride)
    plan, s = _timed(lambda: var.plan(_ctx(layout, c), AttnPlan()))
    analytic = math.prod(window) / math.prod(grid)  # every query sees exactly its window (no text)
    _record(rows, c, size, layout, "na" if na else "gna", f"{setting} w={window} s={stride}", s,
            tensor_bytes(plan.layout, plan.perm, plan.inv), densities(plan.layout),
            window_density=round(analytic, 6), tile=list(var.permutation(layout)[1] or ()))  # fmt: skip


def run_lite(rows, c, size, layout):
    var = LiteAttention()
    state: dict = {}
    plan, s = _timed(lambda: var.plan(_ctx(layout, c, state=state), AttnPlan()))
    per_layer = tensor_bytes(state)
    branches = 1 if c.family == "flux" or c.name == "hunyuanvideo" else 2  # guidance-distilled: no CFG branch
    _record(rows, c, size, layout, "lite", "initial layout (warm-up visits every tile)", s,
            tensor_bytes(plan.layout, var._cache), densities(plan.layout), skip_state_bytes_per_layer=per_layer,
            skip_state_bytes_total=per_layer * c.num_layers * branches, branches=branches)  # fmt: skip


def run_ultravico(rows, c, size, factor: int):
    h, w, f = c.size(size)
    frames = (f - 1) * factor + 1
    layout = c.layout(size, frames=frames)
    var = UltraViCo()
    plan, s = _timed(lambda: var.plan(_ctx(layout, c), AttnPlan()))
    dens = densities(plan.layout) if plan.layout is not None else None
    _record(rows, c, f"{size}x{factor}", layout, "ultravico", f"{factor}x the trained length ({frames} frames)", s,
            tensor_bytes(plan.modifiers, plan.layout, plan.extra), dens, beta_band=bool(plan.extra))  # fmt: skip


def run_regional(rows, c, size, layout):
    h, w, _ = c.size(size)
    var = Regional(entities=[("left", (0, 0, w // 2, h)), ("right", (w // 2, 0, w, h))], height=h, width=w)
    ent_len = {"flux": 512, "sd3": 333, "wan": 226}[c.family]
    lens = (ent_len, ent_len)
    ppt = c.vae_spatial * (2 if c.family in ("flux", "sd3", "wan") else 1)
    if c.family == "wan":
        lay = TokenLayout(grid=layout.grid, family="wan", cross_len=sum(lens) + c.cross_len)
    else:
        lay = TokenLayout(grid=layout.grid, text_len=sum(lens) + c.text_len, text_first=layout.text_first,
                          family=c.family)  # fmt: skip
    cur = {"lens": lens, "ppt": ppt, "cfg": False}
    bl, s = _timed(lambda: var._build(lay, cur, (), torch.device("cpu")))
    _record(rows, c, size, lay, "regional", "2 entities (halves)" + (", cross-attention" if lay.cross_len else ""),
            s, tensor_bytes(bl, var._members), densities(bl))  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", default=None, help="entry names")
    ap.add_argument("--sizes", nargs="*", default=None, help="size names (default: every size of RUNS)")
    ap.add_argument("--variants", nargs="*", default=["radial", "gna", "na", "lite", "ultravico", "regional"])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--markdown", metavar="JSON", help="print the table of a results JSON as markdown and exit")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())["rows"]))
        return {}
    torch.set_num_threads(args.threads)
    rows: list = []
    for name, size in RUNS:
        if (args.only and name not in args.only) or (args.sizes and size not in args.sizes):
            continue
        c = CHECKPOINTS[name]
        layout = c.layout(size)
        video = c.video
        if "radial" in args.variants and video:
            run_radial(rows, c, size, layout)
        if "gna" in args.variants and (video or layout.grid in GNA_PUBLISHED):
            run_gna(rows, c, size, layout)
        if "na" in args.variants and layout.grid in GNA_PUBLISHED:
            run_gna(rows, c, size, layout, na=True)
        if "lite" in args.variants and size == "default":
            run_lite(rows, c, size, layout)
        if "ultravico" in args.variants and video and size == "default":
            for factor in (2, 4):
                run_ultravico(rows, c, size, factor)
        if (
            "regional" in args.variants
            and c.family in ("flux", "sd3")
            or ("regional" in args.variants and c.family == "wan" and "t2v" in c.name and size == "default")
        ):
            if c.family == "wan" or size in ("default", "2048"):
                run_regional(rows, c, size, layout)
    out = {
        "device": {"type": "cpu", "threads": torch.get_num_threads(), "machine": platform.machine()},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "note": "2 CPU cores shared with other jobs: times are upper bounds",
        "rows": rows,
    }
    if args.only is None and args.sizes is None:
        dest = Path(args.out)
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "real_layouts.json").write_text(json.dumps(out, indent=1))
        plot(rows, dest / "real_layouts.png")
    return out


def markdown(rows: list) -> str:
    """The results as a markdown table (docs/checkpoints.md)."""
    out = [
        "| entry | size | tokens | variant | setting | build (s) | memory | block density | token density |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mem = _fmt_bytes(r["bytes"])
        if "skip_state_bytes_per_layer" in r:
            mem += (
                f" + skip state {_fmt_bytes(r['skip_state_bytes_per_layer'])}/layer/branch "
                f"({_fmt_bytes(r['skip_state_bytes_total'])} for all layers, {r['branches']} branch(es))"
            )
        bd = f"{r['block_density']:.4f}" if "block_density" in r else "-"
        td = f"{r['token_density']:.4f}" if "token_density" in r else "-"
        grid = "x".join(map(str, r["grid"]))
        out.append(
            f"| {r['entry']} | {r['size']} | {grid} ({r['tokens']:,}) | {r['variant']} | {r['setting']} | "
            f"{r['build_s']:.2f} | {mem} | {bd} | {td} |"
        )
    return "\n".join(out)


def _fmt_bytes(n: int) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def plot(rows: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['entry']} {r['size']} {r['variant']}" for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(18, 0.28 * len(rows) + 1.5), sharey=True)
    y = range(len(rows))
    axes[0].barh(y, [r["build_s"] for r in rows])
    axes[0].set_xscale("log")
    axes[0].set_xlabel("host build time (s, log)")
    axes[1].barh(y, [max(r["bytes"], 1) / 2**20 for r in rows])
    axes[1].set_xscale("log")
    axes[1].set_xlabel("layout and kept tensors (MiB, log; lite skip state: see the JSON)")
    axes[2].barh(y, [r.get("token_density", float("nan")) for r in rows])
    axes[2].set_xlabel("token density")
    axes[0].set_yticks(list(y), labels, fontsize=7)
    axes[0].invert_yaxis()
    fig.suptitle("attnplug layouts at the official checkpoints' sizes (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
