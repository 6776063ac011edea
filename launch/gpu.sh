#!/usr/bin/env bash
# Run pairuni_jax on one node with several NVIDIA GPUs: one process drives every local GPU (the
# mesh spans them all), so no coordinator is needed. For several nodes, start one process per
# node with --coordinator_address/--num_processes/--process_id (or under SLURM: srun detects them).
#
#   launch/gpu.sh install|weights|run|check [-- main.py flags]
set -euo pipefail

# ---- settings: override any of them from the environment
VENV="${VENV:-.venv}"
JAX_VERSION="${JAX_VERSION:-0.10.2}"        # must match requirements.txt
CUDA="${CUDA:-cuda12}"                      # the jax[...] extra: cuda12 or cuda13
MODEL_ID="${MODEL_ID:-deepseek-ai/Janus-Pro-7B}"
WEIGHTS_DIR="${WEIGHTS_DIR:-weights/Janus-Pro-7B}"
CONFIG="${CONFIG:-configs/pairug.py:7b}"
WORKDIR="${WORKDIR:-runs/pairug}"
GPUS="${GPUS:-}"                            # e.g. 0,1,2,3 (empty: every visible GPU)
MEM_FRACTION="${MEM_FRACTION:-0.95}"        # share of each GPU's memory JAX may take

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"

usage() {
  cat <<EOF
usage: $(basename "$0") COMMAND [-- FLAGS for pairuni_jax.main]

commands:
  install   create \$VENV and install the package with jax[$CUDA]==\$JAX_VERSION
  weights   download \$MODEL_ID to \$WEIGHTS_DIR (hf download)
  check     list the GPUs JAX sees
  run       run the job in the foreground on \$GPUS (all visible GPUs if empty)

settings (environment; current values):
  VENV=$VENV JAX_VERSION=$JAX_VERSION CUDA=$CUDA MODEL_ID=$MODEL_ID WEIGHTS_DIR=$WEIGHTS_DIR
  CONFIG=$CONFIG WORKDIR=$WORKDIR GPUS=${GPUS:-<all>} MEM_FRACTION=$MEM_FRACTION

example:
  $(basename "$0") install && $(basename "$0") weights && GPUS=0,1,2,3 $(basename "$0") run -- \\
      --config.model.path=weights/Janus-Pro-7B
EOF
}

activate() {
  if [[ ! -f "$REPO/$VENV/bin/activate" ]]; then
    echo "no virtualenv at $REPO/$VENV: run '$(basename "$0") install' first" >&2
    exit 1
  fi
  # shellcheck disable=SC1090,SC1091
  . "$REPO/$VENV/bin/activate"
}

gpu_env() {
  [[ -n "$GPUS" ]] && export CUDA_VISIBLE_DEVICES="$GPUS"
  export XLA_PYTHON_CLIENT_MEM_FRACTION="$MEM_FRACTION"
}

cmd_install() {
  cd "$REPO"
  python3 -m venv "$VENV"
  activate
  pip install -q --upgrade pip
  pip install -q -r requirements.txt "jax[$CUDA]==$JAX_VERSION"
}

cmd_weights() {
  cd "$REPO"
  activate
  if command -v hf >/dev/null; then
    hf download "$MODEL_ID" --local-dir "$WEIGHTS_DIR"
  else
    huggingface-cli download "$MODEL_ID" --local-dir "$WEIGHTS_DIR"
  fi
}

cmd_check() {
  cd "$REPO"
  activate
  gpu_env
  python -c 'import jax; print(jax.default_backend(), jax.devices())'
}

cmd_run() {
  cd "$REPO"
  activate
  gpu_env
  exec python -m pairuni_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
}

main() {
  local command="${1:-}"
  [[ $# -gt 0 ]] && shift
  [[ "${1:-}" == "--" ]] && shift
  case "$command" in
    install | weights | check) "cmd_$command" ;;
    run) cmd_run "$@" ;;
    -h | --help | help) usage ;;
    *) usage >&2; exit 2 ;;
  esac
}

main "$@"
