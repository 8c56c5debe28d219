#!/usr/bin/env bash
# Provide the base image the Dockerfiles name in FROM (python:3.11-slim-bookworm) to buildah.
#   deploy/images/base.sh NAME [auto|pull|local]
# auto (default): use it if buildah already has it, else pull it, else make it locally.
# local: a Debian bookworm minbase with Debian's python3 (3.11, like the official image), made by
# debootstrap and committed under the FROM name, labelled org.gcodefp.base=debootstrap so that it is
# never mistaken for the official image. The debootstrap tree is cached as a tarball in
# $GCODEFP_IMAGE_CACHE (default /var/cache/gcodefp-images); a fresh machine builds it from nothing.
set -euo pipefail
name=${1:?usage: base.sh NAME [auto|pull|local]}
mode=${2:-auto}
cache=${GCODEFP_IMAGE_CACHE:-/var/cache/gcodefp-images}
mirror=${GCODEFP_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# python-is-python3: the official image has `python`; the Dockerfiles call it.
packages=python3,python3-venv,python-is-python3,ca-certificates
log() { echo "base: $*" >&2; }

case "$name" in */*) full=$name ;; *) full=docker.io/library/$name ;; esac
if [ "$mode" != local ] && buildah inspect --type image "$full" >/dev/null 2>&1; then
  origin=$(buildah inspect --type image --format '{{index .OCIv1.Config.Labels "org.gcodefp.base"}}' "$full" || true)
  log "$full is present (${origin:-pulled})"
  exit 0
fi
if [ "$mode" != local ]; then
  # No registry reachable here: fail fast instead of retrying for minutes.
  if timeout "${GCODEFP_PULL_TIMEOUT:-60}" buildah pull --retry 0 --quiet "$full" >/dev/null 2>&1; then
    log "pulled $full"; exit 0
  fi
  [ "$mode" = pull ] && { log "cannot pull $full"; exit 1; }
  log "cannot pull $full; making it locally with debootstrap"
fi

mkdir -p "$cache"
tarball="$cache/bookworm-minbase-$(echo "$packages" | tr ',' '-').tar"
if [ ! -s "$tarball" ]; then
  command -v debootstrap >/dev/null || { log "debootstrap is not installed"; exit 1; }
  root=$(mktemp -d "$cache/root.XXXXXX")
  trap 'rm -rf "$root"' EXIT
  t0=$(date +%s)
  debootstrap --variant=minbase --include="$packages" bookworm "$root" "$mirror" >"$cache/debootstrap.log" 2>&1 \
    || { tail -20 "$cache/debootstrap.log" >&2; exit 1; }
  # What the slim images leave out: package caches and lists, docs, man pages, logs.
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/cache/debconf/*-old \
         "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/var/log/*.log "$root"/var/log/apt/*
  find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
  find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
  tar -C "$root" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
  rm -rf "$root"; trap - EXIT
  log "debootstrap took $(( $(date +%s) - t0 ))s; cached $tarball ($(du -h "$tarball" | cut -f1))"
else
  log "using cached $tarball"
fi

ctr=$(buildah from --quiet scratch)
trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
mnt=$(buildah mount "$ctr")
tar -C "$mnt" -xf "$tarball"
buildah umount "$ctr" >/dev/null
buildah config --env LANG=C.UTF-8 --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --cmd python3 --label org.gcodefp.base=debootstrap "$ctr"
buildah commit --quiet --rm "$ctr" "$full" >/dev/null
trap - EXIT
log "committed $full from $tarball"
