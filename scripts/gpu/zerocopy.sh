# Issue 2 on the GPU: CUDA tests of the memory bridge, the GEMM demo, the zerocopy benchmark.
set -u
. scripts/gpu/setup.sh
python3 -m pytest -q -p no:cacheprovider tests/memory tests/runtime tests/test_gemm_guest.py -k "not subprocess" 2>&1 | tee $OUT/pytest-zerocopy.txt
python3 -m driftwood.cli.main demo gemm --device cuda
python3 -m driftwood.cli.main bench zerocopy --device cuda --json $OUT/zerocopy-cuda.json
