#!/usr/bin/env bash
# The GPU run as one command, from the repository root:   benchmarks/gpu_run.sh OUT [--dry-run]
#
# A lent GPU machine's image has torch, triton, transformers and peft but not diffusers. Carry its
# wheels in .whl/ (ignored by git), filled beforehand on a machine with network access:
#     pip download --no-deps -d .whl diffusers importlib_metadata
# and, for the torchao int8 dynamic row (optional; a torchao release built for the image's torch):
#     pip download --no-deps -d .whl torchao
# mixq itself needs no install: run from the root, `import mixq` finds the checkout (mixq/kernels and
# mixq/calib are links to kernels/ and calib/). Everything lands in OUT (benchmarks/gpu_run.py, then
# benchmarks/end_to_end.py).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import diffusers" 2>/dev/null; then
    python3 -m pip install --no-index --find-links .whl diffusers
fi
if ls .whl/torchao-*.whl >/dev/null 2>&1 && ! python3 -c "import torchao" 2>/dev/null; then
    python3 -m pip install --no-index --no-deps --find-links .whl torchao || echo "torchao not installed: its row is skipped"
fi
status=0
python3 -m benchmarks.gpu_run "$@" || status=$?
# The whole SDXL pipeline per stage (fp32, fp16, mixq UNet with and without VAE decoder / text encoders).
if [[ " $* " != *" --dry-run "* ]]; then
    python3 -m benchmarks.end_to_end --device cuda --out "$1" --rounds 5 --lcm-rounds 3 || status=$?
fi
exit $status
