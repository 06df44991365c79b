#!/usr/bin/env bash
# Puts ffmpeg on the lent GPU machine, which has none, for renders with loudness on or to m4b/mp3.
# The carry limit (64 MiB) does not hold both it and .whl/, so it takes two calls while the machine is warm:
#   1. carry [".ffx"]: bash scripts/gpu-ffmpeg.sh        (extracts it to /tmp/bin, which later calls keep)
#   2. carry [".whl", ".devdata"]: bash scripts/gpu-session.sh fastmaya bench ... --render-format m4b --render-loudness acx
# .ffx/ffmpeg.xz is the static binary of the imageio-ffmpeg wheel, compressed:
#   pip download --no-deps imageio-ffmpeg && unzip imageio_ffmpeg-*.whl 'imageio_ffmpeg/binaries/*'
#   xz -c imageio_ffmpeg/binaries/ffmpeg-linux-x86_64-* > .ffx/ffmpeg.xz
set -euo pipefail
mkdir -p /tmp/bin
python3 -c "import lzma, shutil; shutil.copyfileobj(lzma.open('.ffx/ffmpeg.xz'), open('/tmp/bin/ffmpeg', 'wb'))"
chmod +x /tmp/bin/ffmpeg
/tmp/bin/ffmpeg -version | head -1
