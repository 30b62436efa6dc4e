#!/usr/bin/env bash
# The GPU check on a machine with a GPU (about 10 minutes): python3 there must have jax with CUDA,
# flax, optax, orbax-checkpoint, pyyaml, transformers, torch and peft. Results under $OUT (or
# runs/gpu_check): gpu_check.json, gpu_check.md, hf.json, log.txt. Arguments go to gpu_check.py.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-runs/gpu_check}"
mkdir -p "$out"
python3 scripts/gpu_check.py --out "$out" "$@" 2>&1 | tee "$out/log.txt"
exit "${PIPESTATUS[0]}"
