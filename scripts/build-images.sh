#!/usr/bin/env bash
# Builds the two images from the one Dockerfile, named as the chart expects them:
#   REPOSITORY:TAG          the operator (target operator)
#   REPOSITORY-sidecar:TAG  the sidecar every agent pod runs (target sidecar)
# and, with --push, pushes both (after `docker login` to the registry).
#
#   scripts/build-images.sh [--repository REPO] [--tag TAG] [--base IMAGE] [--push]
#
# Defaults: the chart's repository and its appVersion, on the official Python image.
# Deploy what you pushed with `helm install ... --set image.repository=REPO --set
# image.tag=TAG`. With --base local, the base is built from Debian's packages on this
# machine (scripts/local-base.sh), for hosts that reach no container registry.
set -euo pipefail
cd "$(dirname "$0")/.."

repository="ghcr.io/convostore/convostore"
tag="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' charts/convostore/Chart.yaml)"
base=""
push=false
while [ $# -gt 0 ]; do
  case "$1" in
    --repository) repository="$2"; shift 2 ;;
    --tag) tag="$2"; shift 2 ;;
    --base) base="$2"; shift 2 ;;
    --push) push=true; shift ;;
    *) echo "unknown argument: $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done

build_args=()
if [ "$base" = local ]; then
  base="convostore-base:bookworm"
  bash scripts/local-base.sh "$base"
fi
[ -n "$base" ] && build_args+=(--build-arg "BASE=$base")

for target in sidecar operator; do
  name="$repository:$tag"
  [ "$target" = sidecar ] && name="$repository-sidecar:$tag"
  # the classic builder: no buildx plugin needed; host network, as pip reaches PyPI
  DOCKER_BUILDKIT=0 docker build --quiet --network host "${build_args[@]}" \
    --target "$target" --tag "$name" . >/dev/null
  echo "built $name ($(docker image inspect --format '{{.Size}}' "$name") bytes)"
  if $push; then
    docker push "$name"
  fi
done
