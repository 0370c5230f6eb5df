#!/usr/bin/env bash
# The whole GPU set in one go: the GPU tests (Lightning's DeepSpeed strategies, every test marked `gpu`) and the
# benchmarks at GPU sizes, fp32 and bf16, every result in one folder. Run it from the repository root the first
# time a CUDA machine is available; the README's GPU figures are unmeasured until then.
#
#   experiments/gpu_suite.sh [OUT] [--quick]
#
#   OUT      results folder (default runs/gpu_suite/<UTC time>); each step writes OUT/<step>.log (and .json where
#            the benchmark writes one); OUT/summary.tsv lists every step with its exit status and seconds.
#   --quick  smaller sizes and fewer repeats (about 10 minutes on one recent GPU) for a first look or a short lease.
#
# Environment: PYTHON (default .venv/bin/python, else python3); NGPU (default: every visible GPU) for the
# multi-process DeepSpeed benchmark (two or more GPUs exercise the validation split across ranks; with one GPU it
# runs one process); STEP_TIMEOUT (seconds per step, default 1800, --quick 300). A failing step is recorded and
# the suite goes on: a missing CUDA build of a DeepSpeed op must not hide the other results.
set -u
cd "$(dirname "$0")/.."

QUICK=0
OUT=""
for arg in "$@"; do
    case "$arg" in
        --quick) QUICK=1 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) OUT="$arg" ;;
    esac
done
OUT="${OUT:-runs/gpu_suite/$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT"
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [ "$QUICK" = 1 ]; then STEP_TIMEOUT="${STEP_TIMEOUT:-300}"; else STEP_TIMEOUT="${STEP_TIMEOUT:-1800}"; fi
export WANDB_MODE=offline WANDB_SILENT=true PYTHONWARNINGS=ignore

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device visible to $PYTHON: nothing to measure (the CPU figures come from the other benchmarks)" >&2
    exit 2
fi
NGPU="${NGPU:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')}"

printf "step\texit\tseconds\tcommand\n" > "$OUT/summary.tsv"
run_step() {  # run_step NAME COMMAND...: output to OUT/NAME.log, a line in OUT/summary.tsv
    local name="$1"; shift
    local began=$SECONDS
    echo "== $name: $*" | tee "$OUT/$name.log"
    timeout "$STEP_TIMEOUT" "$@" >> "$OUT/$name.log" 2>&1
    local rc=$?
    printf "%s\t%s\t%s\t%s\n" "$name" "$rc" "$((SECONDS - began))" "$*" >> "$OUT/summary.tsv"
    echo "   exit $rc after $((SECONDS - began)) s"
    tail -n 25 "$OUT/$name.log" | sed 's/^/   | /'
}

{
    date -u
    nvidia-smi || true
    "$PYTHON" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
for i in range(torch.cuda.device_count()):
    print("gpu", i, torch.cuda.get_device_name(i), torch.cuda.get_device_properties(i).total_memory // 2**20, "MiB")
for name in ("lightning", "deepspeed", "h5py", "transformers"):
    try:
        module = __import__(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as error:  # noqa: BLE001
        print(name, "not importable:", error)
EOF
    git rev-parse HEAD 2>/dev/null || true
} > "$OUT/environment.txt" 2>&1

# -- tests --------------------------------------------------------------------------------------------------------
run_step tests_lightning_deepspeed "$PYTHON" -m pytest -q -rs tests/test_lightning_deepspeed_gpu.py \
    --junitxml "$OUT/tests_lightning_deepspeed.xml"
run_step tests_gpu_marked "$PYTHON" -m pytest -q -rs -m gpu tests --deselect tests/test_lightning_deepspeed_gpu.py \
    --junitxml "$OUT/tests_gpu_marked.xml"

# -- benchmarks at GPU sizes -------------------------------------------------------------------------------------
if [ "$QUICK" = 1 ]; then
    ENGINE_ARGS=(--seq-lens 128 512 --layers 4 --repeats 2)
    INRUN_ARGS=(--layers 4 --seq-len 256 --batch 16 --steps 6 --repeats 1)
    EMB_ARGS=(--layers 4 --d-model 256 --rounds 2)
    FIXED_ARGS=(--repeats 1)
    DS_ARGS=(--steps 10 --repeats 1 --d-model 256 --layers 4)
else
    ENGINE_ARGS=(--seq-lens 128 512 1024 --layers 12 --vocab 50257 --repeats 3 --compare-routes)
    INRUN_ARGS=(--layers 12 --seq-len 512 --batch 16 --vocab 50257 --steps 10 --repeats 2)
    EMB_ARGS=(--layers 12 --d-model 768 --heads 12 --rounds 4)
    FIXED_ARGS=(--repeats 3)
    DS_ARGS=(--steps 20 --repeats 3 --d-model 768 --layers 12)
fi
for dtype in fp32 bf16; do
    run_step "engine_$dtype" "$PYTHON" -m experiments.bench_engine --device cuda --dtype "$dtype" "${ENGINE_ARGS[@]}" \
        --out "$OUT/engine_$dtype.json"
    for optimizer in adamw sgd; do
        run_step "inrun_${optimizer}_$dtype" "$PYTHON" -m experiments.bench_inrun --device cuda --dtype "$dtype" \
            --optimizer "$optimizer" "${INRUN_ARGS[@]}" --out "$OUT/inrun_${optimizer}_$dtype.json"
    done
    run_step "fixed_costs_$dtype" "$PYTHON" -m experiments.bench_fixed_costs --device cuda --dtype "$dtype" \
        "${FIXED_ARGS[@]}" --out "$OUT/fixed_costs_$dtype.json"
    run_step "embeddings_$dtype" "$PYTHON" -m experiments.bench_embeddings --device cuda --train-dtype "$dtype" \
        "${EMB_ARGS[@]}"
    # one process per GPU (NCCL); ZeRO-2 and ZeRO-3, validation 1/8 of the global batch, split and unsplit
    run_step "deepspeed_$dtype" "$PYTHON" -m torch.distributed.run --nproc_per_node "$NGPU" \
        -m experiments.bench_deepspeed --device cuda --dtype "$dtype" --unsplit "${DS_ARGS[@]}" \
        --json "$OUT/deepspeed_$dtype.json"
done

echo
echo "results in $OUT"
column -t -s $'\t' "$OUT/summary.tsv" 2>/dev/null || cat "$OUT/summary.tsv"
