# Issues 2, 4, 5 on the GPU in one call: the runtime, memory and snapshot tests (CUDA ones
# included), the GEMM demo, `bench zerocopy`, then `bench boundary` and `bench snapshot` on a
# random-weight Llama-3.2-1B-shaped model written here (nothing large travels).
# Carry .whl and .gpucache (prebuilt guests: gemm, chat, bench_decode, wasinn_chat, tests/guests).
set -u
. scripts/gpu/setup.sh
python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/memory tests/runtime tests/test_gemm_guest.py tests/snapshot \
    2>&1 | tee $OUT/pytest-runtime-cuda.txt | tail -20
python3 -m driftwood.cli.main demo gemm --device cuda 2>&1 | tee $OUT/demo-gemm-cuda.txt
python3 -m driftwood.cli.main bench zerocopy --device cuda --json $OUT/zerocopy-cuda.json
MODEL=/tmp/llama3.2-1b-f16.gguf
python3 -m driftwood.model.synthetic --preset llama3.2-1b --dtype f16 -o $MODEL
python3 -m driftwood.cli.main bench boundary --device cuda --model $MODEL --json $OUT/boundary-cuda.json
python3 -m driftwood.cli.main bench snapshot --device cuda --model $MODEL --json $OUT/snapshot-cuda.json
