#!/usr/bin/env bash
# Build the images from the repo's Dockerfiles with buildah (no Docker engine needed; run as root).
#   deploy/images/build.sh [--torch-wheels DIR] [--base auto|pull|local] [inference|dagster|all]
# Images: gcodefp-api:latest (Dockerfile.inference), gcodefp-dagster:latest (Dockerfile.dagster), the
# names docker-compose.yml uses. The FROM image is pulled where a registry is reachable and made
# locally otherwise (deploy/images/base.sh). Prints each image's build time and size, and writes
# them to $GCODEFP_IMAGE_RESULTS (default results/images-build.json).
#
# Where pip needs this machine's CA bundle (a TLS-intercepting proxy: pip's `cert` setting or
# $PIP_CERT names it), the bundle is bind-mounted read-only over the image's own bundle during the
# RUN steps and named by the PIP_CERT build argument; neither ends up in the image.
# --torch-wheels DIR: pip finds torch (the +cpu wheel) in DIR instead of the PyTorch CPU index.
set -euo pipefail
cd "$(dirname "$0")/../.."
here=deploy/images
torch_wheels="" base_mode=auto targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --torch-wheels) torch_wheels=$(realpath "${2:?--torch-wheels needs a folder}"); shift 2 ;;
    --base) base_mode=${2:?--base needs auto, pull or local}; shift 2 ;;
    inference|dagster) targets+=("$1"); shift ;;
    all) targets+=(inference dagster); shift ;;
    *) echo "build.sh: unknown argument '$1' (see the header of $0)" >&2; exit 2 ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=(inference dagster)
command -v buildah >/dev/null || { echo "build.sh: buildah is not installed" >&2; exit 1; }
if [ -n "$torch_wheels" ] && ! ls "$torch_wheels"/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then
  echo "build.sh: --torch-wheels $torch_wheels holds no torch-2.13.0+cpu wheel" >&2; exit 1
fi

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
volumes=()
ca=${PIP_CERT:-$(pip3 config get global.cert 2>/dev/null || true)}
if [ -n "$ca" ] && [ -f "$ca" ]; then
  # Over the base's own bundle (ca-certificates provides it): a mount point that does not exist in
  # the image would be left behind in it as an empty file.
  image_ca=/etc/ssl/certs/ca-certificates.crt
  volumes+=(--volume "$(realpath "$ca"):$image_ca:ro" --build-arg "PIP_CERT=$image_ca")
fi

declare -A dockerfile=([inference]=Dockerfile.inference [dagster]=Dockerfile.dagster)
declare -A tag=([inference]=gcodefp-api:latest [dagster]=gcodefp-dagster:latest)
results=${GCODEFP_IMAGE_RESULTS:-results/images-build.json}
mkdir -p "$(dirname "$results")"
for target in "${targets[@]}"; do
  df=${dockerfile[$target]}
  args=()
  if [ "$target" = dagster ] && [ -n "$torch_wheels" ]; then
    args+=(--volume "$torch_wheels:/opt/torch-wheels:ro" --build-arg "TORCH_PIP_SOURCE=--find-links /opt/torch-wheels")
  fi
  for from in $(awk 'toupper($1) == "FROM" && $2 !~ /^(scratch|build)$/ {print $2}' "$df" | sort -u); do
    bash "$here/base.sh" "$from" "$base_mode"
  done
  echo "build: $df -> ${tag[$target]}"
  t0=$(date +%s)
  # --layers: reruns reuse unchanged steps (the pip installs) from buildah's cache.
  # --pull=false: the base is already here (pulled or made locally); never go to a registry for it.
  buildah bud --isolation chroot --layers --force-rm --pull=false --format docker -f "$df" -t "${tag[$target]}" \
    "${volumes[@]}" "${args[@]}" . >"$scratch/$target.log" 2>&1 || {
    tail -40 "$scratch/$target.log" >&2; echo "build: $df FAILED" >&2; exit 1; }
  seconds=$(( $(date +%s) - t0 ))
  size=$(buildah images --format '{{.Size}}' "${tag[$target]}" | head -1)  # uncompressed, as buildah counts it
  echo "build: ${tag[$target]} built in ${seconds}s, $size"
  # One entry per image, kept across runs that build only one of them.
  python3 - "$results" "$target" "${tag[$target]}" "$seconds" "$size" <<'EOF'
import json, sys, time
path, target, image, seconds, size = sys.argv[1:]
try:
    doc = json.load(open(path))
except (OSError, ValueError):
    doc = {}
doc[target] = {"image": image, "build_seconds": int(seconds), "size": size,
               "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
open(path + ".tmp", "w").write(json.dumps(doc, indent=1) + "\n")
EOF
  mv "$results.tmp" "$results"
done
echo "build: wrote $results"
