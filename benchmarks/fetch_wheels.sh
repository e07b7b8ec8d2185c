#!/usr/bin/env bash
# Download the pure-Python wheels that the lent GPU machine lacks into .whl/ at the repository root (git-ignored;
# a device call carries them with carry [".whl"], and benchmarks/device_check.sh installs them to /tmp/site):
#   liger-kernel (fused_kernels: liger) and jsonargparse + its signature extras (LightningCLI: the fit of section 6).
# Python 3.12, x86-64, as on the device machine; ~2 MB in all.
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude)
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    liger-kernel==0.8.5 jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0
ls -l .whl
