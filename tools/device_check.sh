#!/usr/bin/env bash
# The CUDA checks on a bare GPU machine (this workplace's `device` tool), in one call:
#
#   make device-wheels    # here, once per checkout: .device/wheels, what the GPU image lacks
#   device run:  command "bash tools/device_check.sh"  carry [".device"]  timeout_s 540
#
# The image's python3 holds torch, Triton, pytest, hypothesis, accelerate, transformers and
# timm, but not datasets (imported by the training app, hence by the test collection), and
# maybe a setuptools older than pyproject's >=77; nothing can be downloaded there. So the
# carried wheels go to $SITE (first on PYTHONPATH), the project is installed in editable mode,
# and tools.gpu_check runs the checks whose names contain the arguments (default: the CUDA
# tests and the fused-kernel step benchmark, the two most wanted), writing its report and
# log under $OUT after every check, so a call cut off at its limit still returns them.
# PYTHON=... runs it elsewhere (on a machine without CUDA every check is reported skipped).
set -uo pipefail

PYTHON=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}
SITE=${SITE:-/tmp/bame_site}
WHEELS=.device/wheels
export PYTHONUNBUFFERED=1

if ! compgen -G "$WHEELS/*.whl" > /dev/null; then
    echo "device_check: no wheels in $WHEELS: run 'make device-wheels' and carry .device" >&2
    exit 2
fi
"$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$WHEELS"/*.whl || exit 1
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -m pip install --quiet --no-index --no-deps --no-build-isolation -e . || exit 1
"$PYTHON" - <<'EOF'
import sys, torch, triton
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, "
      f"cuda {torch.cuda.is_available()}", flush=True)
EOF

if [ "$#" -eq 0 ]; then
    set -- tests fused-kernel
fi
"$PYTHON" -m tools.gpu_check --quick --out "$OUT/gpu_check.md" --only "$@" 2>&1 \
    | tee "$OUT/gpu_check.log"
