# Issue 6 on the GPU, in one device call: the batched/graph tests, the kernels against torch,
# a GEMV block-size sweep, the engine check (CUDA vs CPU float32 vs transformers, graphs vs no
# graphs) on 2-layer cuts, then `driftwood bench decode --device cuda` on random-weight
# Llama-3.2-1B GGUFs (BF16, Q4_0, Q8_0) written here in /tmp (nothing large travels).
# Usage (from the repository root, carry .whl): bash scripts/gpu/decode.sh [bench options]
# STAGES (default tests,check,bench) may also name sweep (the quantized kernels' configurations,
# to $OUT/sweep/), int8 (scripts/gpu/int8_sweep.py: the int8-activation kernels), prefill (cold and warm prefill times of each file, one row per call) and
# profile (scripts/gpu/step_profile.py: each step's kernels from the CUDA profiler, batch 1 and 64).
set -u
. scripts/gpu/setup.sh
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
STAGES=${STAGES:-tests,check,bench}
for d in bf16 q4_0 q8_0; do
  [ -f /tmp/llama3.2-1b-$d.gguf ] || python3 -m driftwood.model.synthetic --preset llama3.2-1b \
    --dtype $d -o /tmp/llama3.2-1b-$d.gguf > /dev/null &
done
case $STAGES in *tests*)
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/model/test_batch.py 2>&1 | tee "$OUT/pytest-batch.txt" ;;
esac
case $STAGES in *sweep*)
  timeout ${SWEEP_TIMEOUT:-200} python3 scripts/gpu_engine_check.py --out "$OUT/sweep" --dtypes "" \
    --sweep 2>&1 | tee "$OUT/sweep.txt" ;;
esac
case $STAGES in *int8*)
  timeout ${INT8_TIMEOUT:-300} python3 scripts/gpu/int8_sweep.py "$OUT/int8-sweep.json" 2>&1 | tee "$OUT/int8-sweep.txt" ;;
esac
case $STAGES in *check*)
  timeout ${CHECK_TIMEOUT:-220} python3 scripts/gpu_engine_check.py --out "$OUT" --dtypes bf16,q4_0,q8_0 \
    --tokens 16 ${SWEEP:+--sweep} 2>&1 | tee "$OUT/engine-check.txt" ;;
esac
wait
case $STAGES in *prefill*)
  timeout 120 python3 - <<'PY' 2>&1 | tee "$OUT/prefill.txt"
import time, torch
from driftwood.model import load_model
for d in ("bf16", "q4_0"):
    m = load_model(f"/tmp/llama3.2-1b-{d}.gguf", device="cuda", progress=False)
    s = m.new_session(capacity=4200)
    ids = [(i * 7919) % 100000 + 5 for i in range(4096)]
    for n in (24, 512, 512, 512, 4096, 4096, 4096, 512):
        s.reset(); torch.cuda.synchronize(); t = time.perf_counter()
        s.prefill(ids[:n]); torch.cuda.synchronize()
        print(d, m.weights, n, f"{(time.perf_counter() - t) * 1e3:.1f} ms", flush=True)
    del m, s
    torch.cuda.empty_cache()
PY
;;
esac
case $STAGES in *profile*)
  files=$(for d in ${PROFILE_DTYPES:-bf16 q4_0 q8_0}; do printf %s, /tmp/llama3.2-1b-$d.gguf; done)
  timeout ${PROFILE_TIMEOUT:-180} python3 scripts/gpu/step_profile.py --batch ${PROFILE_BATCH:-1,64} \
    --model "${files%,}" --json "$OUT/step-profile-cuda.json" 2>&1 | tee "$OUT/profile.txt" ;;
esac
case $STAGES in *bench*)
  timeout ${BENCH_TIMEOUT:-240} python3 -m driftwood.cli.main bench decode --device cuda \
    --model /tmp/llama3.2-1b-bf16.gguf,/tmp/llama3.2-1b-q4_0.gguf,/tmp/llama3.2-1b-q8_0.gguf \
    --variants ${VARIANTS:-graphs,graphs-before-splits,graphs-before-loop,graphs-two-kernel-attention,torch-eager} --prefill-lengths 24,512,4096 \
    --json "$OUT/decode-cuda.json" "$@" 2>&1 | tee "$OUT/bench.txt" ;;
esac
