#!/usr/bin/env bash
# Puts ffmpeg on the lent GPU machine, which has none, for renders with loudness on or to m4b/mp3.
# Carry [".ffx", ".whl", ".devdata"] and start the command with `bash scripts/gpu-ffmpeg.sh &&`.
# .ffx/ffmpeg.xz is the static ffmpeg 7.0.2 of the imageio-ffmpeg 0.7.0 wheel, xz-compressed (21 MB): with it,
# .whl/ and .devdata/ fit the 64 MiB carry in one call. (Runs up to D2 used 0.8.1's n9.0.2 build, 48 MB
# compressed, which took a call of its own.) `bash scripts/gpu-ffmpeg.sh --fetch`, here, makes it.
set -euo pipefail
if [ "${1:-}" = "--fetch" ]; then
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps --only-binary=:all: --platform manylinux2014_x86_64 -d "$tmp" imageio-ffmpeg==0.7.0
  (cd "$tmp" && unzip -q imageio_ffmpeg-*.whl 'imageio_ffmpeg/binaries/*')
  mkdir -p .ffx
  grep -qx '/.ffx/' .git/info/exclude || echo '/.ffx/' >> .git/info/exclude
  xz -6 -T0 -c "$tmp"/imageio_ffmpeg/binaries/ffmpeg-linux-x86_64-* > .ffx/ffmpeg.xz
  rm -rf "$tmp"
  exit 0
fi
mkdir -p /tmp/bin
python3 -c "import lzma, shutil; shutil.copyfileobj(lzma.open('.ffx/ffmpeg.xz'), open('/tmp/bin/ffmpeg', 'wb'))"
chmod +x /tmp/bin/ffmpeg
/tmp/bin/ffmpeg -version | head -1
