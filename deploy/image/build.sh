#!/usr/bin/env bash
# `make image`: build classify-worker:<version> with docker or podman (deploy/image/oci.sh) and
# print its name on stdout (everything else goes to stderr, so `IMAGE=$(make -s image)` works).
#
# The base is BASE_IMAGE, by default the Dockerfile's (python:3.11-slim). When that default is
# neither present nor pullable (no registry reachable), a base is built from Debian's packages:
# debootstrap --variant=minbase bookworm with Debian's python3 and python3-venv, upgraded from
# bookworm-updates and bookworm-security, docs and apt lists removed. Its root file system is
# cached as a tarball in .tools/image/, so later builds only import it; BASE_REFRESH=1 rebuilds it.
# A BASE_IMAGE you set yourself is never replaced: if it cannot be had, the build fails.
set -euo pipefail
cd "$(dirname "$0")/../.."

OCI=deploy/image/oci.sh
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
CACHE=${IMAGE_CACHE:-.tools/image}
LOCAL_BASE=classify-worker-base:debian-$SUITE
TARBALL=$CACHE/debian-$SUITE-python3.tar
#: a registry that does not answer at all fails in well under a second; one that hangs gets this long
PULL_TIMEOUT_S=120

say() { printf 'make image: %s\n' "$*" >&2; }

version=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
image=${IMAGE:-classify-worker:$version}
default_base=$(sed -n 's/^ARG BASE_IMAGE=//p' Dockerfile)
base=${BASE_IMAGE:-$default_base}

has_image() { "$OCI" image inspect "$1" >/dev/null 2>&1; }

debootstrap_base() {
  if ! command -v debootstrap >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || { say "cannot build a local base: no debootstrap and no apt-get"; exit 3; }
    say "installing debootstrap from Debian's packages"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >&2
  fi
  mkdir -p "$CACHE"
  local root
  root=$(mktemp -d "$CACHE/rootfs.XXXXXX")
  # shellcheck disable=SC2064  # expand now: the trap must remove this directory
  trap "umount '$root/proc' 2>/dev/null || true; rm -rf '$root'" EXIT
  say "building a base from Debian's packages (debootstrap $SUITE, minbase + python3) into $TARBALL"
  debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
    "$SUITE" "$root" "$MIRROR" >&2
  # debootstrap installs the suite as released: take the point-release and security fixes too
  printf 'deb %s %s main\ndeb %s %s-updates main\ndeb %s %s-security main\n' \
    "$MIRROR" "$SUITE" "$MIRROR" "$SUITE" "$SECURITY_MIRROR" "$SUITE" >"$root/etc/apt/sources.list"
  mount -t proc proc "$root/proc"
  chroot "$root" apt-get update -qq >&2
  chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get upgrade -y -qq >&2
  chroot "$root" apt-get clean
  umount "$root/proc"
  # what a container never reads: apt's lists, docs (copyright files stay), man pages, translations
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/log/* \
    "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/*
  find "$root/usr/share/doc" -type f ! -name copyright -delete
  : >"$root/etc/resolv.conf"  # the engine provides its own; never ship this host's
  chmod 755 "$root"           # mktemp made it 0700: as the image's / it would lock out uid 10001
  tar --numeric-owner --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' \
    -C "$root" -cf "$TARBALL.part" .
  mv "$TARBALL.part" "$TARBALL"
  rm -rf "$root"
  trap - EXIT
  say "base file system cached after $(($(date +%s) - started)) s"
}

local_base() {
  if [ "${BASE_REFRESH:-}" = 1 ] || [ ! -f "$TARBALL" ]; then
    debootstrap_base
  elif has_image "$LOCAL_BASE"; then
    return
  fi
  say "importing $TARBALL as $LOCAL_BASE"
  "$OCI" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    "$TARBALL" "$LOCAL_BASE" >&2
}

started=$(date +%s)
if ! has_image "$base"; then
  say "pulling $base"
  if ! timeout "$PULL_TIMEOUT_S" "$OCI" pull "$base" >&2; then
    if [ -n "${BASE_IMAGE:-}" ]; then
      say "BASE_IMAGE=$base cannot be pulled and is not present"
      exit 2
    fi
    say "$base cannot be pulled (no registry reachable?): using a base built from Debian's packages"
    local_base
    base=$LOCAL_BASE
  fi
fi

# Unchanged inputs (build context, Dockerfile, this script, the base) and the image still there:
# nothing to build. Worth it with vfs, where even a fully cached build takes a minute or more.
inputs=$( (find Dockerfile .dockerignore pyproject.toml README.md worker devkit deploy/image -type f \
  ! -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha256sum; "$OCI" image inspect --format '{{.Id}}' "$base") \
  | sha256sum | cut -c1-64)
stamp=$CACHE/$(echo "$image" | tr ':/' '__').inputs
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$inputs $("$OCI" image inspect --format '{{.Id}}' "$image" 2>/dev/null)" ]; then
  say "$image is up to date (inputs unchanged since it was built)"
  echo "$image"
  exit 0
fi

# The CA bundle pip uses here goes into the build as a secret (see the Dockerfile): on a network
# that intercepts TLS, pip inside the build trusts what pip outside it trusts.
secret=()
ca=${PIP_CERT:-${REQUESTS_CA_BUNDLE:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}}
[ -s "$ca" ] && secret=(--secret "id=pip-cert,src=$ca")

say "building $image on $base with $("$OCI" --which)"
# host network: the build installs the runtime requirements from PyPI
"$OCI" build --network host --target runtime --build-arg "BASE_IMAGE=$base" --build-arg "VERSION=$version" \
  "${secret[@]}" -t "$image" . >&2
mkdir -p "$CACHE"
echo "$inputs $("$OCI" image inspect --format '{{.Id}}' "$image")" >"$stamp"
say "built $image in $(($(date +%s) - started)) s"
echo "$image"
