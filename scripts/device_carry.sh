#!/usr/bin/env bash
# Builds .device_carry/fold_site: the Python packages the GPU stage needs that the device
# machine's image lacks (it has JAX with CUDA, numpy, typer, rich, matplotlib, absl-py,
# tabulate; ../.library/device/KINDS.md lists them), as Python 3.12 x86-64 wheels installed with
# pip --target, here, where pip works. A new checkout has no .device_carry (git-ignored): run
# this once before the first device call, then
#   run(command="PYTHONPATH=src:.device_carry/fold_site OUT=$OUT bash benchmarks/device_run.sh
#       predict", carry=[".device_carry/fold_site"], timeout_s=590)
# The CUDA kernels for GPUs older than sm80 are left out (unused on an H100 or H200), so the
# carry stays under the 64 MiB a call may take. .device_carry/colabfold_site holds what the
# colabfold part of device_run.sh adds over fold_site (colabfold 1.6.3 and the few packages it
# imports that the image lacks; ~2 MB): carry both for that part,
#   carry=[".device_carry/fold_site", ".device_carry/colabfold_site"]
# colabfold pins alphafold-colabfold 2.3.20 and biopython < 1.86, but runs on fold_site's
# (checked on the CPU: benchmarks/gpu_stage.py --colabfold with a tiny set).
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=.device_carry/fold_site
rm -rf "$SITE"
python3 -m pip install -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --target "$SITE" \
  alphafold-colabfold==2.3.27 colabfold-kernels==0.9.0 colabfold-cuda-kernels==0.2.2 \
  colabfold-legacy-kernels==0.6.0 dm-haiku==0.0.17 dm-tree==0.1.10 ml-collections==1.1.0 \
  immutabledict==4.3.1 jmp==0.0.4 biopython==1.88
rm -rf "$SITE"/colabfold_legacy_kernels/kernels/sm7*
du -sh "$SITE"
CF_SITE=.device_carry/colabfold_site
rm -rf "$CF_SITE"
python3 -m pip install -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --target "$CF_SITE" \
  colabfold==1.6.3 importlib-metadata==8.7.0 appdirs==1.4.4 py3Dmol==2.5.5 orjson==3.13.0
du -sh "$CF_SITE"
