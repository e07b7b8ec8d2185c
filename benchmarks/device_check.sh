#!/usr/bin/env bash
# The ONE command of a device call for issue 14 (one H100/H200, < 8 min): carried wheels, the GPU tests, then
# benchmarks/gpu_bench.py with whatever time the tests left. Everything lands under $OUT (at most 8 files):
#   device_check.log (all of it), env.log, gpu_tests.log, gpu_bench.log, gpu_bench.md (the table), gpu_fit.log
#
#   bash benchmarks/fetch_wheels.sh          # here, once: liger-kernel + jsonargparse & co. into .whl/ (git-ignored)
#   device run: command "bash benchmarks/device_check.sh", carry [".whl"], timeout_s 560
#
# Knobs (environment): DEADLINE_S (whole script, default 470 s), TESTS_S (GPU tests, default 90 s),
# BENCH_ARGS (extra gpu_bench.py arguments; e.g. BENCH_ARGS=--smoke tries this script on a CPU machine).
# A failing step is reported and the next one runs; the exit code is the benchmark's.
set -u
start=$(date +%s)
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device_out}
mkdir -p "$OUT"
DEADLINE_S=${DEADLINE_S:-470}
TESTS_S=${TESTS_S:-90}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

main() {
    echo "== device_check $(date -u +%FT%TZ) in $PWD"
    if ls .whl/*.whl >/dev/null 2>&1; then
        if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
            export PYTHONPATH="$PYTHONPATH:/tmp/site"
            echo "installed to /tmp/site: $(cd .whl && ls *.whl | tr '\n' ' ')"
        else
            echo "wheel install FAILED: going on without the carried wheels"
        fi
    else
        echo "no .whl/*.whl carried: liger rows and the Lightning fit (jsonargparse) may be unavailable"
    fi
    {
        nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
        python3 - <<'PY'
import importlib, sys
print("python", sys.version.split()[0])
for m in ("torch", "triton", "lightning", "transformers", "jsonargparse", "liger_kernel", "peft", "tensorboard"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "installed"), getattr(mod, "__file__", ""))
    except Exception as e:
        print(m, "NOT importable:", type(e).__name__, e)
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
PY
    } >"$OUT/env.log" 2>&1
    cat "$OUT/env.log"

    echo "== GPU tests (pytest -m gpu, at most ${TESTS_S} s)"
    per_test=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout=60")
    # shellcheck disable=SC2086
    # -n 0: one process on the one GPU (pyproject asks pytest-xdist for a worker per core)
    timeout "$TESTS_S" python3 -m pytest -q -n 0 -m gpu tests/ -p no:cacheprovider --continue-on-collection-errors \
        $per_test -rfEs >"$OUT/gpu_tests.log" 2>&1
    echo "pytest exit code $? (0 passed, 1 failures, 5 none selected, 124 timed out)"
    tail -n 25 "$OUT/gpu_tests.log"

    left=$((DEADLINE_S - ($(date +%s) - start) - 15))
    budget=$((left < 450 ? left : 450))
    echo "== gpu_bench.py, budget ${budget} s"
    # shellcheck disable=SC2086
    python3 benchmarks/gpu_bench.py --budget-s "$budget" --out "$OUT/gpu_bench.md" --log-dir "$OUT" ${BENCH_ARGS:-} \
        >"$OUT/gpu_bench.log" 2>&1
    rc=$?
    echo "gpu_bench exit code $rc after $(($(date +%s) - start)) s in all"
    grep -E "FAILED|Traceback|Error" "$OUT/gpu_bench.log" | head -n 20
    echo "== table ($OUT/gpu_bench.md)"
    cat "$OUT/gpu_bench.md" 2>/dev/null || tail -n 60 "$OUT/gpu_bench.log"
    return $rc
}

main 2>&1 | tee "$OUT/device_check.log"
exit "${PIPESTATUS[0]}"
