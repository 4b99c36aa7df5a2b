#!/usr/bin/env bash
# One GPU run that fits a short lease: `pytest -m gpu` first, then every benchmark with a GPU mode,
# each section under its own time limit, all of them within TOTAL_BUDGET_S (420 s) including
# Triton's compilation. Every figure a benchmark reports is gated on its own correctness check
# (attn_kernels/verify.py); the summary keeps those checks beside the figures.
#
#   bash benchmarks/run_gpu.sh                 # on the GPU machine (carry .whl for diffusers)
#   bash benchmarks/run_gpu.sh --plan          # the sections and their budgets; exit 1 if over 420 s
#   bash benchmarks/run_gpu.sh --dry-run       # CPU: every section at smoke size, kernels in Triton's
#                                              #   interpreter, output in a temp dir (CI runs this)
#   bash benchmarks/run_gpu.sh --fetch-wheels  # download what the GPU image lacks into .whl/
#
# A section that runs out of time gets SIGINT (Python writes its partial JSON, pytest its JUnit
# report), then SIGKILL GRACE_S later. After every section the summary and the results archive are
# rewritten, so a run cut off anywhere still returns everything finished before. Files in $OUT
# (the device tool's folder; default ./out/gpu_run, git-ignored), at most 8: run_gpu.log,
# run_gpu_summary.json (env: versions, device, clocks; per section: status, rc, seconds, budget,
# and the benchmark JSON's headline incl. its correctness block), pytest_gpu.xml,
# kernel_bench.json, kernel_bench.png, results.tar.gz (every JSON/PNG written plus the log).
# Budgets can be changed in the environment (PYTEST_BUDGET_S, KERNEL_BUDGET_S, ...); extra
# arguments in KERNEL_BENCH_ARGS, DIFFUSION_BENCH_ARGS.
set -u -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
MODE=run
case ${1:-} in
"") ;;
--plan) MODE=plan ;;
--dry-run | --smoke) MODE=dry ;;
--fetch-wheels) MODE=fetch ;;
*)
    echo "usage: bash benchmarks/run_gpu.sh [--plan | --dry-run | --fetch-wheels]" >&2
    exit 2
    ;;
esac
PY=${PYTHON:-$(command -v python3 || command -v python)}
TOTAL_BUDGET_S=${TOTAL_BUDGET_S:-420}
GRACE_S=${GRACE_S:-10}

# The plan: name and budget (seconds, everything included: start-up, compilation, writing).
SECTIONS=(
    "setup ${SETUP_BUDGET_S:-15}"
    "pytest_gpu ${PYTEST_BUDGET_S:-110}"
    "kernel_bench ${KERNEL_BUDGET_S:-190}"
    "diffusion_bench ${DIFFUSION_BUDGET_S:-40}"
    "agent_bench ${AGENT_BUDGET_S:-25}"
    "channel_attn_bench ${CHANNEL_BUDGET_S:-15}"
    "hopper_features ${HOPPER_BUDGET_S:-20}"
)
budget_of() { for s in "${SECTIONS[@]}"; do [[ ${s% *} == "$1" ]] && echo "${s#* }"; done; }
plan_total() {
    local t=0 s
    for s in "${SECTIONS[@]}"; do t=$((t + ${s#* })); done
    echo "$t"
}

if [[ $MODE == plan ]]; then
    printf '%-20s %8s\n' section budget_s
    for s in "${SECTIONS[@]}"; do printf '%-20s %8s\n' "${s% *}" "${s#* }"; done
    printf '%-20s %8s  (limit %s)\n' total "$(plan_total)" "$TOTAL_BUDGET_S"
    (($(plan_total) <= TOTAL_BUDGET_S)) || {
        echo "run_gpu.sh: the sections' budgets add up to more than TOTAL_BUDGET_S" >&2
        exit 1
    }
    exit 0
fi

if [[ $MODE == fetch ]]; then
    # diffusers is pure Python: the version installed here, as a wheel for the image's Python 3.12
    VER=$("$PY" -c "import diffusers; print(diffusers.__version__)") || exit 1
    mkdir -p .whl
    exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 -d .whl "diffusers==$VER"
fi

(($(plan_total) <= TOTAL_BUDGET_S)) || {
    echo "run_gpu.sh: the sections' budgets add up to $(plan_total) s > TOTAL_BUDGET_S=$TOTAL_BUDGET_S" >&2
    exit 1
}
DRY=0
[[ $MODE == dry ]] && DRY=1
if ((DRY)); then
    # The interpreter on a CPU is far slower than the GPU: the dry run checks the plumbing (every
    # section runs, writes its JSON and its checks, the summary collects them), with budgets scaled
    # by DRY_SCALE; the plan itself is checked above, unscaled.
    DRY_SCALE=${DRY_SCALE:-5}
    for i in "${!SECTIONS[@]}"; do
        SECTIONS[i]="${SECTIONS[i]% *} $((${SECTIONS[i]#* } * DRY_SCALE))"
    done
    TOTAL_BUDGET_S=$((TOTAL_BUDGET_S * DRY_SCALE))
    GRACE_S=$((GRACE_S * 2))
    KERNEL_BENCH_ARGS=${KERNEL_BENCH_ARGS:---densities 0.25 --bwd-densities 0.25}
    OUT=${OUT:-$(mktemp -d /tmp/run_gpu_dry.XXXXXX)}
    RES=$(mktemp -d /tmp/run_gpu_dry_results.XXXXXX)
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
else
    OUT=${OUT:-$ROOT/out/gpu_run}
    RES=$ROOT/benchmarks/results
fi
mkdir -p "$OUT" "$RES"
WORK=$(mktemp -d /tmp/run_gpu.XXXXXX)
STEPS=$WORK/steps.tsv
LOG=$OUT/run_gpu.log
: >"$STEPS"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!
# The image's Triton caches compiled kernels here; autotuning tries the table's best 2 per key.
export PYTHONUNBUFFERED=1 PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} MPLBACKEND=Agg
export ATTNPLUG_TUNE_TOP=${ATTNPLUG_TUNE_TOP:-2}
START=$(date +%s)
DEADLINE=$((START + TOTAL_BUDGET_S))
touch "$WORK/stamp"

# Rewrite the summary JSON and the results archive (after every section).
summarize() {
    find "$RES" -maxdepth 1 -type f \( -name '*.json' -o -name '*.png' \) -newer "$WORK/stamp" >"$WORK/new.txt"
    grep -E '/kernel_bench[^/]*\.(json|png)$' "$WORK/new.txt" | xargs -r cp -t "$OUT"/
    "$PY" - "$STEPS" "$WORK/new.txt" "$OUT/pytest_gpu.xml" "$WORK/env.json" "$DRY" "$START" \
        >"$OUT/run_gpu_summary.json.tmp" <<'EOF'
import json, pathlib, sys, time, xml.etree.ElementTree as ET
steps_f, new_f, junit_f, env_f, dry, start = sys.argv[1:]
cols = ("section", "status", "rc", "seconds", "budget_s", "note")
steps = [dict(zip(cols, ln.split("\t"))) for ln in pathlib.Path(steps_f).read_text().splitlines() if ln]
try:
    env = json.loads(pathlib.Path(env_f).read_text())
except Exception as e:
    env = {"unreadable": f"{type(e).__name__}: {e}"}
out = {"dry_run": dry == "1", "elapsed_s": round(time.time() - float(start)), "sections": steps, "env": env,
       "results": {}}
try:
    r = ET.parse(junit_f).getroot()
    suites = [r] if r.tag == "testsuite" else list(r)
    out["pytest"] = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    out["pytest"]["failed"] = [f"{c.get('classname')}::{c.get('name')}" for s in suites for c in s.iter("testcase")
                               if c.find("failure") is not None or c.find("error") is not None]
except Exception as e:
    out["pytest"] = {"unreadable": f"{type(e).__name__}: {e}"}
KEEP = ("device", "versions", "complete", "interrupted", "targets", "all_targets_pass", "all_checks_pass",
        "correctness", "ratios", "errors", "skipped")
for p in pathlib.Path(new_f).read_text().split():
    if not p.endswith(".json"):
        continue
    name = pathlib.Path(p).name
    try:
        data = json.loads(pathlib.Path(p).read_text())
    except Exception as e:
        out["results"][name] = f"unreadable: {e}"
        continue
    if name.startswith("kernel_bench"):  # its full JSON travels beside this file
        data = {k: data.get(k) for k in KEEP}
    out["results"][name] = data
print(json.dumps(out, indent=1, default=str))
EOF
    mv "$OUT/run_gpu_summary.json.tmp" "$OUT/run_gpu_summary.json"
    # shellcheck disable=SC2046
    tar -czf "$OUT/results.tar.gz" -C "$RES" $(xargs -r -n1 basename <"$WORK/new.txt") -C "$OUT" run_gpu.log \
        2>/dev/null || tar -czf "$OUT/results.tar.gz" -C "$OUT" run_gpu.log
}

# section NAME CMD...: run CMD with the section's budget (cut to the time left): SIGINT at the
# budget minus GRACE_S, SIGKILL at the budget; record status, rc, seconds; then summarize.
section() {
    local name=$1
    shift
    local budget left t0 rc status
    budget=$(budget_of "$name")
    left=$((DEADLINE - $(date +%s)))
    ((budget > left)) && budget=$left
    if ((budget < 2 * GRACE_S)); then
        printf '%s\tskipped\t-\t0\t%s\tno time left\n' "$name" "$budget" >>"$STEPS"
        echo "=== [$name] skipped: no time left"
        summarize
        return 0
    fi
    echo "=== [$name] budget ${budget}s: $*"
    t0=$(date +%s)
    timeout -s INT -k "$GRACE_S" "$((budget - GRACE_S))" "$@"
    rc=$?
    status=ok
    if ((rc == 124 || rc == 130 || rc == 137)); then status=timeout; elif ((rc != 0)); then status=failed; fi
    printf '%s\t%s\t%s\t%s\t%s\t\n' "$name" "$status" "$rc" "$(($(date +%s) - t0))" "$budget" >>"$STEPS"
    echo "=== [$name] $status (rc=$rc) after $(($(date +%s) - t0))s"
    summarize
}

setup() {
    # Wheels carried in .whl (e.g. diffusers, which the GPU image lacks) go to /tmp/site; only those
    # whose module is missing, since PYTHONPATH comes before the image's own packages.
    if ((!DRY)) && compgen -G ".whl/*.whl" >/dev/null; then
        mapfile -t WHEELS < <("$PY" - .whl/*.whl <<'EOF'
import importlib.util, os, sys
for w in sys.argv[1:]:
    if importlib.util.find_spec(os.path.basename(w).split("-")[0].lower()) is None:
        print(w)
EOF
        )
        if ((${#WHEELS[@]})) && "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target /tmp/site "${WHEELS[@]}"; then
            echo "=== wheels installed to /tmp/site: ${WHEELS[*]}"
        fi
    fi
    "$PY" - "$WORK/env.json" <<'EOF'
import importlib, json, platform, subprocess, sys, time
env = {"utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "python": platform.python_version()}
for m in ("torch", "triton", "timm", "diffusers", "transformers", "xformers", "numpy"):
    try:
        env[m] = importlib.import_module(m).__version__
    except Exception as e:
        env[m] = f"missing ({type(e).__name__})"
import torch
env["cuda"] = torch.version.cuda
env["cuda_available"] = torch.cuda.is_available()
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    env["device"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                     "memory_gib": round(p.total_memory / 2**30, 1)}
q = "name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,temperature.gpu"
try:
    r = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True, text=True,
                       timeout=20)
    env["nvidia_smi"] = dict(zip(q.split(","), [x.strip() for x in r.stdout.strip().split(",")])) if r.stdout else r.stderr
except Exception as e:
    env["nvidia_smi"] = f"not available ({type(e).__name__})"
json.dump(env, open(sys.argv[1], "w"), indent=1)
print(json.dumps(env))
EOF
}

echo "=== run_gpu.sh $(date -u +%FT%TZ) dry_run=$DRY root=$ROOT out=$OUT results=$RES plan=$(plan_total)s"
T0=$(date +%s)
setup
printf 'setup\tok\t0\t%s\t%s\t\n' "$(($(date +%s) - T0))" "$(budget_of setup)" >>"$STEPS"
summarize
[[ -d /tmp/site ]] && export PYTHONPATH=$PYTHONPATH:/tmp/site

SM=""
((DRY)) && SM="--smoke --out $RES"
# 1. correctness on the GPU first (table tiles; one test autotunes), 4 workers compile in parallel
XDIST=""
((!DRY)) && "$PY" -c "import xdist" 2>/dev/null && XDIST="-n 4"
PYTEST_TARGET=tests
((DRY)) && PYTEST_TARGET="tests/kernels/test_verify.py tests/kernels/test_gpu.py"
# shellcheck disable=SC2086
section pytest_gpu env ATTNPLUG_AUTOTUNE="${PYTEST_AUTOTUNE:-0}" "$PY" -m pytest -m gpu -q -p no:cacheprovider \
    $XDIST --junitxml="$OUT/pytest_gpu.xml" -o junit_family=xunit2 $PYTEST_TARGET
# 2. kernels vs SDPA / Flex / xformers: stops starting measurements 30 s before its limit
KB=$(budget_of kernel_bench)
# shellcheck disable=SC2086
section kernel_bench "$PY" benchmarks/kernel_bench.py $SM --budget-s $((KB - GRACE_S - 30)) \
    $( ((DRY)) && echo "--backend triton") ${KERNEL_BENCH_ARGS:-}
# 3. diffusion op level (needs diffusers: carry its wheel in .whl)
if "$PY" -c "import diffusers" 2>/dev/null; then
    DB="--no-4x --warmup 1 --iters 3"
    ((DRY)) && DB=""
    # shellcheck disable=SC2086
    section diffusion_bench "$PY" benchmarks/diffusion_bench.py $SM $DB ${DIFFUSION_BENCH_ARGS:-}
else
    printf 'diffusion_bench\tskipped\t-\t0\t0\tdiffusers not importable (bash benchmarks/run_gpu.sh --fetch-wheels)\n' \
        >>"$STEPS"
fi
# 4. vision kernels
# shellcheck disable=SC2086
section agent_bench "$PY" benchmarks/agent_bench.py $( ((DRY)) && echo "--smoke --out $RES" || echo "--gpu --out $RES")
# shellcheck disable=SC2086
section channel_attn_bench "$PY" benchmarks/channel_attn_bench.py $SM
# 5. Hopper features on trial (TMA descriptors, warp specialisation) in the dense loop vs production
# shellcheck disable=SC2086
section hopper_features "$PY" benchmarks/hopper_features.py $SM

echo "=== sections (name status rc seconds budget note)"
column -t -s $'\t' "$STEPS" 2>/dev/null || cat "$STEPS"
"$PY" - "$OUT/run_gpu_summary.json" <<'EOF' || true
import json, sys
s = json.load(open(sys.argv[1]))
print("pytest:", s.get("pytest"))
for name, r in s["results"].items():
    if isinstance(r, dict) and isinstance(r.get("targets"), list):
        print(f"{name}: all checks pass = {r.get('all_checks_pass')}, all targets pass = {r.get('all_targets_pass')}")
        for t in r["targets"]:
            v = "n/a" if t["value"] is None else f"{t['value']:.3f}"
            print(f"  {t['target']:<20} {t['case']:<28} {v:>8} {t['cmp']} {t['threshold']:<5} pass={t['pass']}")
EOF
echo "=== done in $(($(date +%s) - START))s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
rm -rf "$WORK"
((DRY)) && rm -rf "$RES"
exec 1>&- 2>&-
wait "$TEE_PID" 2>/dev/null
exit 0
