#!/usr/bin/env bash
# One-command GPU run: `pytest -m gpu`, then every benchmark with a GPU mode, each under its own
# time limit, so that one lent-GPU call (10 minutes at most) brings back all the figures.
#
#   bash benchmarks/run_gpu.sh            # on the GPU machine (device tool: carry .whl for diffusers)
#   bash benchmarks/run_gpu.sh --smoke    # plumbing check on a CPU machine: benchmarks in --smoke, temp output
#
# Writes to $OUT (the device tool's folder; default ./out/gpu_run, which git ignores), at most 8 files:
#   run_gpu.log (everything printed), run_gpu_summary.json (steps, exit codes, seconds, the
#   benchmarks' JSON), pytest_gpu.xml (JUnit), kernel_bench.json, kernel_bench.png, results.tar.gz
#   (every JSON/PNG the benchmarks wrote plus the log). Benchmarks write their JSON/PNG into
#   benchmarks/results/ too (smoke: a temp dir). A failing or timed-out step is recorded and the
#   next one runs. Budgets (seconds) can be set in the environment: TOTAL_BUDGET_S, PYTEST_BUDGET_S,
#   KERNEL_BUDGET_S, DIFFUSION_BUDGET_S, AGENT_BUDGET_S, CHANNEL_BUDGET_S; extra arguments in
#   KERNEL_BENCH_ARGS, DIFFUSION_BENCH_ARGS.
set -u -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
SMOKE=0
[[ ${1:-} == --smoke ]] && SMOKE=1
PY=${PYTHON:-$(command -v python3 || command -v python)}
OUT=${OUT:-$ROOT/out/gpu_run}
mkdir -p "$OUT"
if ((SMOKE)); then RES=$(mktemp -d /tmp/run_gpu_smoke.XXXXXX); else RES=$ROOT/benchmarks/results; fi
WORK=$(mktemp -d /tmp/run_gpu.XXXXXX)
STEPS=$WORK/steps.tsv
LOG=$OUT/run_gpu.log
: >"$STEPS"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!
export PYTHONUNBUFFERED=1 PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} MPLBACKEND=Agg
START=$(date +%s)
DEADLINE=$((START + ${TOTAL_BUDGET_S:-560}))
touch "$WORK/stamp"

# step NAME BUDGET_S CMD...: run CMD under `timeout`, cut to the time left; record status, rc, seconds.
step() {
    local name=$1 budget=$2
    shift 2
    local left=$((DEADLINE - $(date +%s) - 15))
    if ((left < 20)); then
        printf '%s\tskipped\t-\t0\t0\tno time left\n' "$name" >>"$STEPS"
        echo "=== [$name] skipped: no time left"
        return 0
    fi
    ((budget > left)) && budget=$left
    echo "=== [$name] budget ${budget}s: $*"
    local t0 rc status
    t0=$(date +%s)
    timeout -k 15 "$budget" "$@"
    rc=$?
    status=ok
    if ((rc == 124 || rc == 137)); then status=timeout; elif ((rc != 0)); then status=failed; fi
    printf '%s\t%s\t%s\t%s\t%s\t\n' "$name" "$status" "$rc" "$(($(date +%s) - t0))" "$budget" >>"$STEPS"
    echo "=== [$name] $status (rc=$rc) after $(($(date +%s) - t0))s"
}
skip() { printf '%s\tskipped\t-\t0\t0\t%s\n' "$1" "$2" >>"$STEPS"; echo "=== [$1] skipped: $2"; }
budget_of() {  # what `step` will grant: min(wanted, time left)
    local left=$((DEADLINE - $(date +%s) - 15))
    ((left < $1)) && echo "$left" || echo "$1"
}

echo "=== run_gpu.sh $(date -u +%FT%TZ) smoke=$SMOKE root=$ROOT out=$OUT results=$RES"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,utilization.gpu \
    --format=csv 2>&1 || echo "nvidia-smi: not available"

# Wheels carried in .whl (e.g. diffusers, which the GPU image lacks) go to /tmp/site; only those
# whose module is missing here, since PYTHONPATH comes before the image's own packages.
if [[ ${RUN_GPU_WHEELS:-1} == 1 ]] && compgen -G ".whl/*.whl" >/dev/null; then
    mapfile -t WHEELS < <("$PY" - .whl/*.whl <<'EOF'
import importlib.util, os, sys
for w in sys.argv[1:]:
    if importlib.util.find_spec(os.path.basename(w).split("-")[0].lower()) is None:
        print(w)
EOF
    )
    if ((${#WHEELS[@]} == 0)); then
        echo "=== wheels in .whl: all importable already, none installed"
    elif "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "${WHEELS[@]}"; then
        export PYTHONPATH=$PYTHONPATH:/tmp/site
        echo "=== wheels installed to /tmp/site: ${WHEELS[*]}"
    else
        echo "=== wheel install failed (continuing without)"
    fi
fi
"$PY" - <<'EOF' 2>&1 | tee "$WORK/env.txt"
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
for m in ("triton", "timm", "diffusers", "xformers", "matplotlib"):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as e:
        print(m, "missing:", type(e).__name__)
EOF

SM=""  # benchmark arguments of the smoke (a mktemp path: no spaces)
((SMOKE)) && SM="--smoke --out $RES"
# 1. correctness on the GPU (the table's first tile per kernel: autotuning is the benchmarks' job)
step pytest_gpu "${PYTEST_BUDGET_S:-100}" env ATTNPLUG_AUTOTUNE="${PYTEST_AUTOTUNE:-0}" \
    "$PY" -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors \
    --junitxml="$OUT/pytest_gpu.xml" -o junit_family=xunit2 tests
# 2. kernels vs SDPA / Flex / xformers (stops measuring 40 s before its limit and writes what it has)
KB=$(budget_of "${KERNEL_BUDGET_S:-270}")
# shellcheck disable=SC2086
step kernel_bench "$KB" "$PY" benchmarks/kernel_bench.py $SM --budget-s $((KB > 80 ? KB - 40 : KB / 2)) \
    ${KERNEL_BENCH_ARGS:-}
# 3. diffusion end-to-end (needs diffusers: carry its wheel in .whl)
if "$PY" -c "import diffusers" 2>/dev/null; then
    DB="--no-4x --warmup 1 --iters 3"
    ((SMOKE)) && DB=""
    # shellcheck disable=SC2086
    step diffusion_bench "${DIFFUSION_BUDGET_S:-90}" "$PY" benchmarks/diffusion_bench.py $SM $DB \
        ${DIFFUSION_BENCH_ARGS:-}
else
    skip diffusion_bench "diffusers not importable (carry its wheel: see benchmarks/results/README.md)"
fi
# 4. vision kernels
# shellcheck disable=SC2086
step agent_bench "${AGENT_BUDGET_S:-60}" "$PY" benchmarks/agent_bench.py $SM
# shellcheck disable=SC2086
step channel_attn_bench "${CHANNEL_BUDGET_S:-45}" "$PY" benchmarks/channel_attn_bench.py $SM
# 5. Hopper features on trial (TMA descriptors, warp specialisation) in the dense loop vs production
# shellcheck disable=SC2086
step hopper_features "${HOPPER_BUDGET_S:-45}" "$PY" benchmarks/hopper_features.py $SM
# cpu_reference_bench (if present) is CPU-only: not run here.

# Collect: the benchmarks' new JSON/PNG into results.tar.gz; summary JSON; the kernel_bench pair.
find "$RES" -maxdepth 1 -type f \( -name '*.json' -o -name '*.png' \) -newer "$WORK/stamp" >"$WORK/new.txt"
grep -E '/kernel_bench[^/]*\.(json|png)$' "$WORK/new.txt" | xargs -r cp -t "$OUT"/
"$PY" - "$STEPS" "$WORK/new.txt" "$OUT/pytest_gpu.xml" "$WORK/env.txt" "$SMOKE" >"$OUT/run_gpu_summary.json" <<'EOF'
import json, pathlib, sys, xml.etree.ElementTree as ET
steps_f, new_f, junit_f, env_f, smoke = sys.argv[1:]
cols = ("step", "status", "rc", "seconds", "budget_s", "note")
steps = [dict(zip(cols, ln.split("\t"))) for ln in pathlib.Path(steps_f).read_text().splitlines() if ln]
out = {"smoke": smoke == "1", "steps": steps, "env": pathlib.Path(env_f).read_text().splitlines(), "results": {}}
try:
    r = ET.parse(junit_f).getroot()
    suites = [r] if r.tag == "testsuite" else list(r)
    out["pytest"] = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    out["pytest"]["failed"] = [f"{c.get('classname')}::{c.get('name')}" for s in suites for c in s.iter("testcase")
                               if c.find("failure") is not None or c.find("error") is not None]
except Exception as e:
    out["pytest"] = {"unreadable": f"{type(e).__name__}: {e}"}
for p in pathlib.Path(new_f).read_text().split():
    if not p.endswith(".json"):
        continue
    try:
        data = json.loads(pathlib.Path(p).read_text())
    except Exception as e:
        out["results"][pathlib.Path(p).name] = f"unreadable: {e}"
        continue
    if pathlib.Path(p).name.startswith("kernel_bench"):  # its full JSON is returned beside this file
        data = {k: data.get(k) for k in ("device", "versions", "complete", "targets", "all_targets_pass",
                                         "ratios", "errors", "skipped")}
    out["results"][pathlib.Path(p).name] = data
print(json.dumps(out, indent=1, default=str))
EOF
tar -czf "$OUT/results.tar.gz" -C "$RES" $(xargs -r -n1 basename <"$WORK/new.txt") -C "$OUT" run_gpu.log 2>/dev/null ||
    echo "=== results.tar.gz: nothing to pack or tar failed"

echo "=== steps (name status rc seconds budget note)"
column -t -s $'\t' "$STEPS" 2>/dev/null || cat "$STEPS"
"$PY" - "$OUT/run_gpu_summary.json" <<'EOF' || true
import json, sys
s = json.load(open(sys.argv[1]))
print("pytest:", s.get("pytest"))
for name, r in s["results"].items():
    if isinstance(r, dict) and isinstance(r.get("targets"), list):
        print(f"{name}: all targets pass = {r.get('all_targets_pass')}")
        for t in r["targets"]:
            v = "n/a" if t["value"] is None else f"{t['value']:.3f}"
            print(f"  {t['target']:<20} {t['case']:<28} {v:>8} {t['cmp']} {t['threshold']:<5} pass={t['pass']}")
EOF
echo "=== done in $(($(date +%s) - START))s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
rm -rf "$WORK"
exec 1>&- 2>&-
wait "$TEE_PID" 2>/dev/null
exit 0
