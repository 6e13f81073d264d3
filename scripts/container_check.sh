#!/usr/bin/env bash
# Builds the Dockerfile's image with Debian's podman and checks that `hawker serve` answers inside it:
# /health, a chat completion from the default model, and the gateway metrics.
#
#   bash scripts/container_check.sh                  # BASE_IMAGE from a registry (debian:bookworm-slim)
#   DEBOOTSTRAP=1 bash scripts/container_check.sh    # no registry: a Debian base made by debootstrap
#
# Other settings (environment): PODMAN_RUNTIME (e.g. runc where crun cannot run, on hybrid cgroups),
# PODMAN_LIMITS (e.g. "--ulimit nofile=1024:1024 --ulimit nproc=4096:4096" where raising rlimits is
# not allowed), BUILD_ARGS (extra `podman build` flags: a proxy's CA, a local wheel folder), PORT.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${PORT:-18080}
IMAGE=localhost/hawker:latest
if ! command -v podman >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman
fi
PODMAN=(podman ${PODMAN_RUNTIME:+--runtime "$PODMAN_RUNTIME"})
# shellcheck disable=SC2206 # word splitting wanted: lists of flags
LIMITS=(${PODMAN_LIMITS:-})
# shellcheck disable=SC2206
EXTRA=(${BUILD_ARGS:-})
BASE=()
if [ -n "${DEBOOTSTRAP:-}" ]; then
  command -v debootstrap >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap
  ROOTFS=$(mktemp -d)
  debootstrap --variant=minbase bookworm "$ROOTFS" http://deb.debian.org/debian >/dev/null
  tar -C "$ROOTFS" -c . | podman import - localhost/debian:bookworm-minbase >/dev/null
  rm -rf "$ROOTFS"
  BASE=(--build-arg BASE_IMAGE=localhost/debian:bookworm-minbase)
fi
start=$(date +%s)
"${PODMAN[@]}" build --format docker --network host "${LIMITS[@]}" "${BASE[@]}" "${EXTRA[@]}" -t "$IMAGE" .
echo "built $IMAGE in $(( $(date +%s) - start )) s: $(podman image inspect "$IMAGE" --format '{{.Size}}') bytes"
container=$("${PODMAN[@]}" run -d --network host "${LIMITS[@]}" "$IMAGE" --port "$PORT")
trap '"${PODMAN[@]}" rm -f "$container" >/dev/null' EXIT
start=$(date +%s)
until curl -sf "localhost:$PORT/health" >/dev/null; do
  if [ $(( $(date +%s) - start )) -gt 300 ]; then "${PODMAN[@]}" logs "$container"; exit 1; fi
  sleep 2
done
echo "healthy after $(( $(date +%s) - start )) s: $(curl -s "localhost:$PORT/health")"
curl -sf "localhost:$PORT/v1/chat/completions" -H 'content-type: application/json' \
  -d '{"messages":[{"role":"user","content":"What is the capital of France?"}],"max_tokens":20,"temperature":0}'
echo
curl -sf "localhost:$PORT/metrics" | grep '^vllm:'
