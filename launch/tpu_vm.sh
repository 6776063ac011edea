#!/usr/bin/env bash
# Run pairuni_jax on a Cloud TPU VM or a multi-host pod slice: create it, install the package on
# every worker, fetch the Janus-Pro weights, run the job on all workers, follow the logs, delete.
#
#   launch/tpu_vm.sh create|install|weights|data|run|logs|status|stop|ssh|delete|up [-- flags]
#
# Every worker runs the same command; the job finds its peers through the TPU metadata server
# (pairuni_jax/train/distributed.py), so no coordinator flags are needed on a pod slice.
set -euo pipefail

# ---- settings: override any of them from the environment, e.g. ACCELERATOR=v5p-32 launch/...
TPU_NAME="${TPU_NAME:-pairuni}"
ZONE="${ZONE:-us-central2-b}"
PROJECT="${PROJECT:-}"                      # empty: gcloud's configured project
ACCELERATOR="${ACCELERATOR:-v4-32}"         # v4-8 is one host; v4-32 is 4 hosts of 4 chips
RUNTIME="${RUNTIME:-tpu-ubuntu2204-base}"   # TPU VM image (v5e: v2-alpha-tpuv5-lite, v6e: v2-alpha-tpuv6e)
SPOT="${SPOT:-0}"                           # 1: a preemptible (spot) slice
JAX_VERSION="${JAX_VERSION:-0.10.2}"        # must match requirements.txt
REMOTE_DIR="${REMOTE_DIR:-pairuni_jax}"     # checkout location on each worker (under ~)
MODEL_ID="${MODEL_ID:-deepseek-ai/Janus-Pro-7B}"
WEIGHTS_DIR="${WEIGHTS_DIR:-weights/Janus-Pro-7B}"  # relative to REMOTE_DIR
DATA_URL="${DATA_URL:-}"                    # a bucket prefix holding the PairUG data, e.g. gs://b/pairug
DATA_DIR="${DATA_DIR:-data/pairug}"         # where `data` copies it on each worker (under REMOTE_DIR)
CONFIG="${CONFIG:-configs/pairug.py:7b}"
WORKDIR="${WORKDIR:-runs/pairug}"           # a pod slice needs a shared path, e.g. gs://bucket/run
LOG="${LOG:-run.log}"                       # job log on each worker (under REMOTE_DIR)
WORKER="${WORKER:-0}"                       # the worker `logs` and `ssh` talk to

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"

usage() {
  cat <<EOF
usage: $(basename "$0") COMMAND [-- FLAGS for pairuni_jax.main]

commands:
  create    create the TPU VM / pod slice \$TPU_NAME (\$ACCELERATOR in \$ZONE)
  install   copy this checkout to every worker and pip install it with jax[tpu]==\$JAX_VERSION
  weights   download \$MODEL_ID to \$WEIGHTS_DIR on every worker (hf download)
  data      copy \$DATA_URL (pairs JSONL + images) to \$DATA_DIR on every worker (faster to
            read than the bucket, which --config.data.path may also name directly)
  run       start the job on every worker in the background (log: \$REMOTE_DIR/\$LOG)
  logs      follow the log of worker \$WORKER (Ctrl-C stops following, not the job)
  status    show whether the job runs on each worker, with the last log line
  stop      stop the job on every worker (the job saves a checkpoint on SIGTERM)
  ssh       open a shell on worker \$WORKER
  delete    delete the TPU VM / pod slice
  up        create, install, weights, data (when \$DATA_URL is set), run, logs

settings (environment; current values):
  TPU_NAME=$TPU_NAME ZONE=$ZONE PROJECT=${PROJECT:-<gcloud default>}
  ACCELERATOR=$ACCELERATOR RUNTIME=$RUNTIME SPOT=$SPOT JAX_VERSION=$JAX_VERSION
  REMOTE_DIR=$REMOTE_DIR MODEL_ID=$MODEL_ID WEIGHTS_DIR=$WEIGHTS_DIR
  DATA_URL=${DATA_URL:-<unset>} DATA_DIR=$DATA_DIR
  CONFIG=$CONFIG WORKDIR=$WORKDIR LOG=$LOG WORKER=$WORKER

example (Janus-Pro-7B, full fine-tuning over fsdp 4 x tensor 4, a v4-32 slice, data and
workdir on GCS):
  ACCELERATOR=v4-32 DATA_URL=gs://my-bucket/pairug WORKDIR=gs://my-bucket/pairuni-7b \\
      $(basename "$0") up -- --config.model.path=weights/Janus-Pro-7B \\
      --config.data.path=data/pairug/pairs.jsonl --config.mesh.tensor=4
EOF
}

gcloud_tpu() {
  local project=()
  [[ -n "$PROJECT" ]] && project=(--project "$PROJECT")
  gcloud compute tpus tpu-vm "$@" --zone "$ZONE" "${project[@]}"
}

on_workers() {  # on_workers WORKERS COMMAND: run a shell command on the given workers
  gcloud_tpu ssh "$TPU_NAME" --worker "$1" --command "$2"
}

quoted() {  # the arguments as one shell-quoted string
  local out="" arg
  for arg in "$@"; do out+=" $(printf '%q' "$arg")"; done
  printf '%s' "${out# }"
}

cmd_create() {
  local extra=()
  [[ "$SPOT" == 1 ]] && extra+=(--spot)
  gcloud_tpu create "$TPU_NAME" --accelerator-type "$ACCELERATOR" --version "$RUNTIME" \
    "${extra[@]}"
}

cmd_install() {
  local archive
  archive="$(mktemp -d)/pairuni_jax.tar.gz"
  if git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1; then
    git -C "$REPO" archive --format=tar.gz -o "$archive" HEAD  # committed files only
  else
    tar -C "$REPO" --exclude=.venv --exclude=runs --exclude=weights -czf "$archive" .
  fi
  gcloud_tpu scp "$archive" "$TPU_NAME:pairuni_jax.tar.gz" --worker all
  on_workers all "mkdir -p $REMOTE_DIR && tar -xzf pairuni_jax.tar.gz -C $REMOTE_DIR && \
    cd $REMOTE_DIR && python3 -m venv .venv && . .venv/bin/activate && \
    pip install -q --upgrade pip && pip install -q -r requirements.txt \
      'jax[tpu]==$JAX_VERSION' && \
    python -c 'import jax; print(jax.process_index(), jax.local_devices())'"
}

cmd_weights() {
  on_workers all "cd $REMOTE_DIR && . .venv/bin/activate && \
    if command -v hf >/dev/null; then hf download $MODEL_ID --local-dir $WEIGHTS_DIR; \
    else huggingface-cli download $MODEL_ID --local-dir $WEIGHTS_DIR; fi"
}

cmd_data() {
  if [[ -z "$DATA_URL" ]]; then
    echo "DATA_URL is not set: give the bucket prefix of the PairUG data, e.g. gs://b/pairug" >&2
    exit 2
  fi
  on_workers all "mkdir -p $REMOTE_DIR/$DATA_DIR && \
    gcloud storage cp -r '${DATA_URL%/}/*' $REMOTE_DIR/$DATA_DIR/"
}

cmd_run() {
  local flags
  flags="$(quoted --config="$CONFIG" --workdir="$WORKDIR" "$@")"
  # nohup + pid file: the job outlives the ssh session and `stop` ends exactly this process.
  on_workers all "cd $REMOTE_DIR && . .venv/bin/activate && \
    nohup python -m pairuni_jax.main $flags > $LOG 2>&1 < /dev/null & echo \$! > run.pid && \
    echo \"worker \$(hostname): started pid \$(cat run.pid)\""
}

cmd_logs() {
  on_workers "$WORKER" "tail -n 100 -F $REMOTE_DIR/$LOG"
}

cmd_status() {
  on_workers all "cd $REMOTE_DIR && if [ -f run.pid ] && kill -0 \$(cat run.pid) 2>/dev/null; \
    then echo \"\$(hostname): running\"; else echo \"\$(hostname): not running\"; fi; \
    tail -n 1 $LOG 2>/dev/null || true"
}

cmd_stop() {
  on_workers all "cd $REMOTE_DIR && if [ -f run.pid ]; then kill -TERM \$(cat run.pid) || true; \
    fi"
}

cmd_ssh() {
  gcloud_tpu ssh "$TPU_NAME" --worker "$WORKER"
}

cmd_delete() {
  gcloud_tpu delete "$TPU_NAME" --quiet
}

main() {
  local command="${1:-}"
  [[ $# -gt 0 ]] && shift
  [[ "${1:-}" == "--" ]] && shift
  case "$command" in
    create | install | weights | data | logs | status | stop | ssh | delete) "cmd_$command" ;;
    run) cmd_run "$@" ;;
    up)
      cmd_create && cmd_install && cmd_weights
      if [[ -n "$DATA_URL" ]]; then cmd_data; fi
      cmd_run "$@" && cmd_logs
      ;;
    -h | --help | help) usage ;;
    *) usage >&2; exit 2 ;;
  esac
}

main "$@"
