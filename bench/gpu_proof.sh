#!/usr/bin/env bash
# The GPU worker, proven on a bare machine with an NVIDIA GPU: install the project with its `gpu`
# extras (tensorflow[and-cuda]: TensorFlow finds CUDA and cuDNN in its nvidia-* wheels, only the
# driver comes from the machine) into a virtual environment of its own, then run
# `python -m bench.gpu --require-gpu`: a `gpu`-queue worker and a CPU worker behind the real web
# tier, on the embedded stack (SQLite + the filesystem broker: no Postgres, no Redis to install).
#
#   bench/gpu_proof.sh [--venv DIR] [--wheels DIR] [--python PY] [--skip-install] [-- bench.gpu options]
#
#   --venv DIR      the virtual environment (default .venv-gpu in the repository; never .venv,
#                   whose tensorflow-cpu would clash with tensorflow[and-cuda])
#   --wheels DIR    install offline from a folder of wheels (pip install --no-index --find-links DIR),
#                   made on a Linux x86-64 machine with the same Python minor version by
#                   `pip wheel -w DIR '.[gpu]' requests` in the repository (about 3 GB: TensorFlow
#                   and the CUDA libraries). Without it, pip uses its configured index.
#   --python PY     the interpreter the environment is made from (default python3; 3.11 or newer)
#   --skip-install  use the environment as it is
#
# Needs RAVDESS under ../shared/datasets/ravdess beside the repository (or shared/datasets inside
# it; or pass `-- --datasets DIR`). Writes $OUT/gpu.json (OUT defaults to ./gpu-proof) and the
# web and worker logs beside it, and prints the summary. Exit status: bench.gpu's (1 when a job
# failed or went to the wrong worker, or when the models did not run on the GPU).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo/.venv-gpu"
wheels=""
python="python3"
install=1
while [ $# -gt 0 ]; do
    case "$1" in
        --venv) venv="$2"; shift 2 ;;
        --wheels) wheels="$(cd "$2" && pwd)"; shift 2 ;;
        --python) python="$2"; shift 2 ;;
        --skip-install) install=0; shift ;;
        --) shift; break ;;
        -h|--help) sed -n '2,23p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) break ;;
    esac
done
started=$SECONDS
say() { printf '[gpu-proof %4ds] %s\n' "$((SECONDS - started))" "$*" >&2; }

say "machine: $(nproc) cores; $(command -v nvidia-smi >/dev/null && nvidia-smi -L 2>&1 | head -4 || echo 'no nvidia-smi')"
if [ "$install" = 1 ]; then
    [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
    pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
    if [ -n "$wheels" ]; then
        say "installing ser-service[gpu] offline from $wheels"
        "${pip[@]}" --no-index --find-links "$wheels" "ser-service[gpu]" requests
    else
        say "installing $repo[gpu] from the package index (TensorFlow and CUDA: about 3 GB)"
        "${pip[@]}" "$repo[gpu]" requests
    fi
fi
py="$venv/bin/python"
say "installed: $("$py" -m pip list 2>/dev/null | grep -iE '^(tensorflow|keras|nvidia-cudnn)' | tr -s ' ' | paste -sd ';' -)"
# What TensorFlow sees, before the service starts: the first thing to read when the proof fails.
"$py" - <<'EOF' >&2 || true
import os
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
import tensorflow as tf
info = tf.sysconfig.get_build_info()
print("[gpu-proof] tensorflow", tf.__version__, "built for CUDA", info.get("cuda_version"), "cuDNN",
      info.get("cudnn_version"), "sees GPUs:", tf.config.list_physical_devices("GPU"))
EOF

args=("$@")
if [ ! -d "$repo/../shared/datasets/ravdess" ] && [ -d "$repo/shared/datasets/ravdess" ]; then
    args=(--datasets "$repo/shared/datasets" "${args[@]}")
fi
out="${OUT:-$PWD/gpu-proof}"
mkdir -p "$out"
say "running bench.gpu (results in $out)"
cd "$repo"
status=0
PYTHONPATH="$repo" "$py" -m bench.gpu --require-gpu --out "$out/gpu.json" "${args[@]}" || status=$?
say "done, exit $status"
exit "$status"
