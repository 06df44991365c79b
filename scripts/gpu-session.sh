#!/usr/bin/env bash
# Runs a command on the lent GPU machine, which has torch and transformers but no network:
# installs the carried wheels (.whl/, made by scripts/gpu-wheels.sh), points the data
# folder at the carried copy (.devdata/), then runs "$@" with `fastmaya` on the PATH.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
python3 -c "import zipfile; zipfile.ZipFile('.whl/lmd/lmdeploy-0.18.0-stripped.zip').extractall('/tmp/site')"
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# Multi-GPU hosts here require NVLink multicast off.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p /tmp/bin && printf '#!/bin/sh\nexec python3 -m fastmaya_cli.cli "$@"\n' > /tmp/bin/fastmaya && chmod +x /tmp/bin/fastmaya
export PATH=/tmp/bin:$PATH
"$@"
