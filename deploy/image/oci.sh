#!/usr/bin/env bash
# One container engine for `make image`, `make image-test` and you: `deploy/image/oci.sh <args>` is
# `docker <args>` where a Docker daemon answers, else `podman <args>` with the flags that make podman
# work as root on these machines (found by trying):
#   --storage-driver vfs   works everywhere as root (overlay: see OCI_STORAGE_DRIVER below)
#   --runtime runc         crun refuses the hybrid cgroup v1/v2 layout
#   --ulimit nofile/nproc  explicit limits on `run`/`create`/`build`: podman's defaults are above what
#                          this process may set, and runc fails to start the container
#   --format docker        on `build`: the OCI image format has no HEALTHCHECK and podman drops it
# When neither is there, podman (and runc) are installed from Debian's packages with apt-get.
# `deploy/image/oci.sh --which` prints the engine it would use: docker or podman.
set -euo pipefail

say() { printf 'oci.sh: %s\n' "$*" >&2; }

docker_answers() {
  command -v docker >/dev/null 2>&1 && timeout 10 docker info >/dev/null 2>&1
}

install_podman() {
  if ! command -v apt-get >/dev/null 2>&1; then
    say "no Docker daemon and no podman, and no apt-get to install podman: install docker or podman"
    exit 3
  fi
  local sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  say "no Docker daemon and no podman: installing podman and runc from Debian's packages"
  "${sudo[@]}" apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq podman runc >&2
}

engine() {
  if docker_answers; then
    echo docker
    return
  fi
  if ! command -v podman >/dev/null 2>&1 || ! command -v runc >/dev/null 2>&1; then
    install_podman
  fi
  echo podman
}

ENGINE=${OCI_ENGINE:-$(engine)}
if [ "${1:-}" = "--which" ]; then
  echo "$ENGINE"
  exit 0
fi
if [ "$ENGINE" = docker ]; then
  exec docker "$@"
fi

# podman: global flags first, then the per-command ones right after the subcommand.
# Limits no higher than podman's own: it caps its process count at the kernel's pid_max (runc
# fails with "error setting rlimit type 6" above that, and without CAP_SYS_RESOURCE above ours).
at_most() { if [ "$1" = unlimited ] || [ "$1" -gt "$2" ]; then echo "$2"; else echo "$1"; fi; }
nofile=$(at_most "$(ulimit -Hn)" 1048576)
nproc=$(at_most "$(ulimit -Hu)" "$(cat /proc/sys/kernel/pid_max)")
limits=(--ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc")
# OCI_STORAGE_DRIVER=overlay is 2-3x faster to build where the kernel allows it (it did on this
# kind of machine, in a store of its own: a store keeps the driver it was created with).
global=(--storage-driver "${OCI_STORAGE_DRIVER:-vfs}" --runtime runc)
sub=${1:-}
[ $# -gt 0 ] && shift
case "$sub" in
  run | create) exec podman "${global[@]}" "$sub" "${limits[@]}" "$@" ;;
  build) exec podman "${global[@]}" build --format docker "${limits[@]}" "$@" ;;
  "") exec podman "${global[@]}" ;;
  *) exec podman "${global[@]}" "$sub" "$@" ;;
esac
