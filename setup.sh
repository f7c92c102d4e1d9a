#!/usr/bin/env bash
# Set up mlx_diffusion on this machine: the package and, on Linux, the OpenBLAS that makes mlx-cpu fast.
#   ./setup.sh          runtime only
#   ./setup.sh --test   also the test/benchmark dependencies (PyTorch CPU, diffusers, transformers, Gradio and
#                       Playwright) and, on Linux, Debian's chromium for the web demo's browser test
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
updated=""

if [ "$(uname -s)" = Linux ] && ! ldconfig -p 2>/dev/null | grep -q 'libopenblas\.so\.0'; then
  echo "setup: installing OpenBLAS (Debian/Ubuntu package libopenblas0-pthread)"
  $SUDO apt-get update -qq && updated=1 && $SUDO apt-get install -y -qq libopenblas0-pthread >/dev/null \
    || echo "setup: could not install OpenBLAS; mlx_diffusion will warn and run ~40x slower fp32 matmuls"
fi

if [ "${1:-}" = "--test" ] && [ "$(uname -s)" = Linux ] && ! command -v chromium >/dev/null; then
  echo "setup: installing Chromium for the web demo's browser test (Debian packages chromium, chromium-driver)"
  { [ -n "$updated" ] || $SUDO apt-get update -qq; } && \
    $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null \
    || echo "setup: could not install chromium; the browser test will be skipped"
fi

extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
$PY -m pip install -q --disable-pip-version-check -e ".${extra}"
$PY -c "import mlx_diffusion, mlx_diffusion.backends.blas as b; print('setup: mlx_diffusion', mlx_diffusion.__version__, '| BLAS:', b.loaded_path or b.status)"
