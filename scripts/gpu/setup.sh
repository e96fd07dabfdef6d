# Sourced at the start of every device-machine run (see docs/gpu.md): installs the carried
# wheels, points Python at the checkout and the carried guest cache.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src:$PWD
export DRIFTWOOD_CACHE=$PWD/.gpucache
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, wasmtime; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
