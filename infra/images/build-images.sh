#!/usr/bin/env bash
# Build the images jobs run in, with no registry: the base image (build-base.sh: mmdebstrap +
# docker import) and the job image (job_image/Dockerfile FROM it, cloudpickle installed offline
# from wheels downloaded here on the host).
#
# Usage: infra/images/build-images.sh [--force] [--base IMAGE] [--tag NAME:TAG]
#   --base   base image (default cumulus-base:bookworm, built when missing; e.g. python:3.11-slim
#            where a registry is reachable)
#   --force  rebuild the job image even when its inputs did not change
# The job image is labelled with a hash of its inputs and skipped when up to date (~0.2 s).
# Prints the job image ID on stdout (last line). Every node that runs jobs needs the image:
# run this on each worker, or `docker save cumulus-job:latest | ssh NODE docker load`.
set -euo pipefail
cd "$(dirname "$0")/../.."

TAG=cumulus-job:latest
BASE=cumulus-base:bookworm
FORCE=0
while [ $# -gt 0 ]; do
    case "$1" in
        --force) FORCE=1 ;;
        --base) BASE=$2; shift ;;
        --tag) TAG=$2; shift ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done

say() { printf '[build-images %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

if [ "$BASE" = cumulus-base:bookworm ]; then
    bash infra/images/build-base.sh >/dev/null
fi
docker image inspect "$BASE" >/dev/null 2>&1 || { say "base image $BASE not found"; exit 1; }

CTX=$(mktemp -d /tmp/cumulus-job-image.XXXXXX)
trap 'rm -rf "$CTX"' EXIT
mkdir -p "$CTX/wheels" "$CTX/vendor" "$CTX/job_image"
cp job_image/Dockerfile job_image/entrypoint.sh "$CTX/"
cp job_image/__init__.py job_image/runner.py job_image/package.py job_image/requirements.py job_image/warm.py job_image/tracing.py "$CTX/job_image/"

# cloudpickle, the same version as the SDK's when we can tell, as a wheel from the index.
PIN=cloudpickle
if [ -x .venv/bin/python ]; then
    v=$(.venv/bin/python -c 'import cloudpickle; print(cloudpickle.__version__)' 2>/dev/null || true)
    [ -z "$v" ] || PIN="cloudpickle==$v"
fi
WHEELS=${CUMULUS_IMAGE_WHEELS:-/var/cache/cumulus/wheels}
mkdir -p "$WHEELS"
download() { timeout 120 "$1" -m pip download --quiet --disable-pip-version-check \
    --only-binary :all: --no-deps -d "$WHEELS" "$PIN" >/dev/null 2>&1; }
got=0
for py in python3 .venv/bin/python; do
    if command -v "$py" >/dev/null 2>&1 && "$py" -m pip --version >/dev/null 2>&1 && download "$py"; then
        got=1; break
    fi
done
if [ "$got" = 0 ] && python3 -m venv "$CTX/venv" >/dev/null 2>&1 && download "$CTX/venv/bin/python"; then
    got=1
fi
if [ "$got" = 1 ]; then
    cp "$WHEELS"/cloudpickle-*.whl "$CTX/wheels/"
    # Keep only the wheel we pinned when several versions accumulated in the cache.
    if [ "$PIN" != cloudpickle ]; then
        find "$CTX/wheels" -name 'cloudpickle-*.whl' ! -name "cloudpickle-${PIN#cloudpickle==}-*" -delete
    fi
    say "cloudpickle wheel: $(ls "$CTX/wheels")"
else
    # No index: copy the package from a local installation (pure Python).
    where='import cloudpickle, os; print(os.path.dirname(cloudpickle.__file__))'
    src=$(.venv/bin/python -c "$where" 2>/dev/null || python3 -c "$where" 2>/dev/null) \
        || { say "cloudpickle: no index reachable and none installed here"; exit 1; }
    cp -r "$src" "$CTX/vendor/"
    say "cloudpickle copied from $src (no index)"
fi

HASH=$( (echo "$BASE $(docker image inspect --format '{{.Id}}' "$BASE")"; \
         cd "$CTX" && find . -path ./venv -prune -o -type f -print | LC_ALL=C sort | xargs sha256sum) \
        | sha256sum | cut -c1-16)
if [ "$FORCE" = 0 ] && [ "$(docker image inspect --format '{{index .Config.Labels "cumulus.inputs"}}' "$TAG" 2>/dev/null)" = "$HASH" ]; then
    say "$TAG is up to date (inputs $HASH)"
    docker image inspect --format '{{.Id}}' "$TAG"
    exit 0
fi
rm -rf "$CTX/venv"
t=$(date +%s.%N)
DOCKER_BUILDKIT=0 timeout 600 docker build --quiet --build-arg "BASE=$BASE" \
    --label "cumulus.inputs=$HASH" -t "$TAG" "$CTX" >/dev/null
say "built $TAG FROM $BASE in $(awk -v a="$t" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1fs", b-a}')"

out=$(timeout 60 docker run --rm --network none --read-only --entrypoint python3 "$TAG" \
    -c 'import cloudpickle, job_image.runner; print(2+2)')
[ "$out" = 4 ] || { say "smoke test failed: got '$out'"; exit 1; }
say "smoke test ok (user $(docker image inspect --format '{{.Config.User}}' "$TAG"))"
docker image inspect --format '{{.Id}}' "$TAG"
