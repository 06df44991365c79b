#!/usr/bin/env bash
# Run here, from the project root, before carrying .whl/ to the lent GPU machine: the wheels that
# ../shared/device/fetch-wheels.sh fetches, plus those the H200 image of 2026-12-03 also lacked
# (soundfile's cffi and pycparser, quicktok-v1 for the bench's tokenizer, num2words for the text stage).
# Each one missing there cost a machine start that session. Then `bash scripts/gpu-ffmpeg.sh --fetch`.
set -euo pipefail
bash ../shared/device/fetch-wheels.sh >/dev/null
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl cffi pycparser quicktok-v1 num2words
du -sh .whl
