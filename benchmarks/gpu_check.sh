#!/usr/bin/env bash
# The one-command GPU check: build, full test suite, quick benchmarks, every result in OUTDIR.
#
#   benchmarks/gpu_check.sh OUTDIR
#
# Run from a checkout on a machine with an NVIDIA GPU, torch (CUDA build) and triton. No
# network needed. Steps, each under its own `timeout` so the whole stays under 10 minutes
# on an H100:
#
#   env      nvidia-smi, nvcc, python package versions, git revision      -> env.txt, backends.json
#   deps     which optional packages are present (peft, segment_anything,  -> deps.txt
#            pytest, pytest-benchmark, matplotlib); with WHEELS=/dir, installs missing
#            ones from local wheels (pip --no-index). Missing ones are reported; the
#            benchmarks then skip those providers instead of failing.
#   build    python setup.py build_ext --inplace, for this GPU's architecture only   -> build.log
#   tests    pytest tests (GPU tests included)                             -> tests.log, junit.xml
#   layer    benchmarks/bench_layer.py --quick                             -> layer/ (json, md, png)
#   sam      benchmarks/bench_sam.py --quick --max-batch (if segment_anything) -> sam/
#
# A failing step does not stop the others; the script exits non-zero at the end if any
# step failed, and steps.txt lists each step's exit status and duration. Everything is
# also packed into OUTDIR/gpu_check.tar.gz.
#
# Knobs: PYTHON (default python), MAX_JOBS (default nproc), LORA_FUSED_CUDA_ARCHS (default:
# this GPU's compute capability), WHEELS (folder of wheels for missing packages),
# SKIP_BUILD=1 (use an extension already built), and per-step limits in seconds:
# T_BUILD (200), T_TESTS (150), T_LAYER (110), T_SAM (100).

set -u -o pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
mkdir -p "$1" || { echo "gpu_check: cannot create OUTDIR $1" >&2; exit 2; }
OUT=$(cd "$1" && pwd) || { echo "gpu_check: cannot enter OUTDIR $1" >&2; exit 2; }
cd "$(dirname "$0")/.." || { echo "gpu_check: cannot enter the checkout above $0" >&2; exit 2; }
ROOT=$(pwd)
PY=${PYTHON:-python}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
FAILED=()
: > "$OUT/steps.txt"

# step NAME LIMIT_SECONDS COMMAND...: run with a time limit, log to OUT/NAME.log, record the outcome.
step() {
    local name=$1 limit=$2
    shift 2
    local start rc
    start=$(date +%s)
    echo "== $name (limit ${limit}s)"
    echo "\$ $*" > "$OUT/$name.log"
    timeout --kill-after=15 "$limit" "$@" >> "$OUT/$name.log" 2>&1
    rc=$?
    local took=$(( $(date +%s) - start ))
    { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && echo "   timed out after ${limit}s" | tee -a "$OUT/$name.log"
    echo "$name rc=$rc ${took}s" | tee -a "$OUT/steps.txt"
    if [ $rc -ne 0 ]; then
        FAILED+=("$name(rc=$rc)")
        tail -n 15 "$OUT/$name.log" | sed 's/^/   | /'
    fi
    return 0
}

has_module() { "$PY" -c "import $1" > /dev/null 2>&1; }

# -- env ------------------------------------------------------------------------------
env_report() {
    echo "date_utc: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(hostname)"
    echo "git: $(git rev-parse HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | grep -q . && echo dirty)"
    echo "--- nvidia-smi"
    nvidia-smi || echo "nvidia-smi failed"
    nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,clocks.max.sm --format=csv || true
    echo "--- nvcc"
    nvcc --version 2>&1 || echo "nvcc not on PATH (CUDA_HOME=${CUDA_HOME:-unset})"
    echo "--- python"
    "$PY" - <<'PYEOF'
import importlib, platform, torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
for name in ("triton", "peft", "segment_anything", "pytest", "pytest_benchmark", "matplotlib", "numpy"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "present"))
    except Exception as exc:
        print(name, "MISSING", type(exc).__name__, exc)
PYEOF
    "$PY" -m pip list 2>/dev/null
}
export PY
export -f env_report
echo "== env"
timeout 60 bash -c env_report > "$OUT/env.txt" 2>&1 || echo "env report incomplete (rc=$?)" | tee -a "$OUT/env.txt"

# -- deps -----------------------------------------------------------------------------
{
    for module in peft segment_anything pytest pytest_benchmark matplotlib; do
        if ! has_module "$module" && [ -n "${WHEELS:-}" ]; then
            package=${module//_/-}
            "$PY" -m pip install --no-index --find-links "$WHEELS" "$package" > /dev/null 2>&1 \
                && echo "$module: installed from $WHEELS" || echo "$module: not installable from $WHEELS"
        fi
        if has_module "$module"; then echo "$module: present"; else echo "$module: MISSING"; fi
    done
} > "$OUT/deps.txt"
cat "$OUT/deps.txt"
if ! has_module pytest; then
    echo "pytest is missing: the test step cannot run" | tee -a "$OUT/deps.txt"
fi

# -- build ----------------------------------------------------------------------------
if [ -z "${LORA_FUSED_CUDA_ARCHS:-}" ]; then
    cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' ')
    [ -n "$cap" ] && export LORA_FUSED_CUDA_ARCHS="$cap"
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [ "${SKIP_BUILD:-0}" = "1" ]; then
    echo "build skipped (SKIP_BUILD=1)" | tee -a "$OUT/steps.txt"
else
    step build "${T_BUILD:-200}" "$PY" setup.py build_ext --inplace
fi
"$PY" -c "import lora_fused, json; print(json.dumps(lora_fused.backend_report(), indent=1))" \
    > "$OUT/backends.json" 2>&1 || true

# -- tests ----------------------------------------------------------------------------
if has_module pytest; then
    step tests "${T_TESTS:-150}" "$PY" -m pytest tests -q -rA -p no:cacheprovider --junitxml="$OUT/junit.xml"
else
    echo "tests rc=skipped: pytest is not installed (see deps.txt)" | tee -a "$OUT/steps.txt"
    FAILED+=("tests(pytest missing)")
fi

# -- benchmarks -----------------------------------------------------------------------
T_LAYER=${T_LAYER:-110}
step layer "$T_LAYER" "$PY" benchmarks/bench_layer.py --quick --device cuda --out "$OUT/layer" \
    --time-budget $(( T_LAYER - 30 ))

T_SAM=${T_SAM:-100}
if has_module segment_anything; then
    step sam "$T_SAM" "$PY" benchmarks/bench_sam.py --quick --max-batch --device cuda --out "$OUT/sam" \
        --time-budget $(( T_SAM - 25 ))
else
    echo "sam skipped: segment_anything is not installed (see deps.txt)" | tee -a "$OUT/steps.txt"
fi

# -- summary --------------------------------------------------------------------------
{
    echo "# GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/GPU: /'
    echo "git: $(git rev-parse HEAD 2>/dev/null)"
    echo
    echo '```'
    cat "$OUT/steps.txt" "$OUT/deps.txt"
    echo '```'
    [ -f "$OUT/tests.log" ] && { echo; echo "tests: $(tail -n 1 "$OUT/tests.log")"; }
    if [ ${#FAILED[@]} -gt 0 ]; then echo; echo "FAILED steps: ${FAILED[*]}"; else echo; echo "all steps passed"; fi
} > "$OUT/summary.md"
(cd "$OUT" && tar czf gpu_check.tar.gz --exclude=gpu_check.tar.gz . 2> /dev/null) || true
cat "$OUT/summary.md"

if [ ${#FAILED[@]} -gt 0 ]; then
    echo "gpu_check: failed steps: ${FAILED[*]}" >&2
    exit 1
fi
echo "gpu_check: all steps passed; results in $OUT"
