#!/usr/bin/env bash
# On the lent GPU machine (../shared/GPU.md): join the onnxruntime-gpu parts sent earlier into
# /tmp/p, check them against SHA256, install it and the engine's missing dependencies under
# /tmp/lse (no network there), then run tools/gpu_bench.py (about 8 minutes; arguments pass
# through, e.g. --precision fp16 --cuda-graphs for the engine runs). Wheels: .gpu/ (git-ignored),
# made by ../shared/tools/ort-gpu-parts and, for cp312, `pip download --no-deps` of click, psutil,
# pyzmq, simplejpeg, opencv-python-headless and onnxconverter-common into .gpu/small and .gpu/cv.
set -euo pipefail
cd "$(dirname "$0")/.."
P=/tmp/p
mkdir -p "$P"
cp -n .gpu/parts/part-* .gpu/small/* .gpu/cv/* "$P"/ 2>/dev/null || true
whl="$P/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl"
cat "$P"/part-a? > "$whl"
echo "$(cat .gpu/parts/SHA256 2>/dev/null || cat "$P"/SHA256)  $whl" | sha256sum -c -
python3 -m pip install -q --no-deps --target /tmp/lse/ort "$whl"
python3 -m pip install -q --no-deps --no-index --target /tmp/lse/deps "$P"/click-*.whl "$P"/psutil-*.whl \
  "$P"/pyzmq-*.whl "$P"/simplejpeg-*.whl "$P"/opencv_python_headless-*.whl "$P"/onnxconverter_common-*.whl
export PYTHONPATH=/tmp/lse/ort:/tmp/lse/deps:$PWD
python3 -c "import onnxruntime as o, onnxconverter_common as c; print(o.__file__, o.__version__, c.__version__)"
exec python3 tools/gpu_bench.py --out "${OUT:-out/gpu}" "$@"
