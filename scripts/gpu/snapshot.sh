# Issue 5 on the GPU: the snapshot tests with CUDA (exact round trips on the device, CUDA <-> CPU
# within the stated tolerance, pinned host-memory restores) and `driftwood bench snapshot` on a
# random-weight Llama-3.2-1B-shaped model, written here (nothing large travels), then the parts
# of a restore from a directory store (scripts/gpu/snapshot_dir_profile.py, bench:restore-profile).
# The guests the tests run (chat, snapshot_probe, wasi_probe) must be in the carried .gpucache.
set -u
. scripts/gpu/setup.sh
MODEL=/tmp/llama3.2-1b-f16.gguf
python3 -m driftwood.model.synthetic --preset llama3.2-1b --dtype f16 -o $MODEL
python3 -m pytest -q -p no:cacheprovider tests/snapshot -m "not slow" 2>&1 | tee $OUT/pytest-snapshot.txt
python3 -m driftwood.cli.main bench snapshot --device cuda --model $MODEL --json $OUT/snapshot-cuda.json
python3 scripts/gpu/snapshot_dir_profile.py $MODEL $OUT/restore-profile-cuda.json
