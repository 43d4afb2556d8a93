#!/usr/bin/env bash
# Build the images jobs run in, with no registry: the base image (build-base.sh: mmdebstrap +
# docker import) and the job image (job_image/Dockerfile FROM it): the in-job runner, the
# Cumulus SDK (`import cumulus` works in a job as it does on the process backend) and the
# SDK's runtime dependencies, installed offline from wheels gathered here on the host.
#
# Usage: infra/images/build-images.sh [--force] [--base IMAGE] [--tag NAME:TAG]
#   --base   base image (default cumulus-base:bookworm, built when missing; e.g. python:3.11-slim
#            where a registry is reachable)
#   --force  rebuild the job image even when its inputs did not change
# The job image is labelled with a hash of its inputs (the SDK's sources among them) and skipped
# when up to date. Prints the job image ID on stdout (last line). Every node that runs jobs
# needs the image: run this on each worker, or `docker save cumulus-job:latest | ssh NODE
# docker load`. Wheels are cached in $CUMULUS_IMAGE_WHEELS (default /var/cache/cumulus/wheels).
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
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done

say() { printf '[build-images %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

if [ "$BASE" = cumulus-base:bookworm ]; then
    bash infra/images/build-base.sh >/dev/null
fi
BASE_ID=$(docker image inspect --format '{{.Id}}' "$BASE" 2>/dev/null) \
    || { say "base image $BASE not found"; exit 1; }

CTX=$(mktemp -d /tmp/cumulus-job-image.XXXXXX)
trap 'rm -rf "$CTX"' EXIT
mkdir -p "$CTX/wheels" "$CTX/vendor" "$CTX/job_image" "$CTX/sdk"
cp job_image/Dockerfile job_image/entrypoint.sh "$CTX/"
cp job_image/__init__.py job_image/runner.py job_image/package.py job_image/requirements.py job_image/warm.py job_image/tracing.py "$CTX/job_image/"

# The SDK: the `cumulus` package (not its command line: a job has no bus to talk to) and the
# first-party packages it imports. A job's function pickles `cumulus` by reference, and a
# module shipped as source runs its own `import cumulus` in the job.
find cumulus shared cumulus_core -path cumulus/cli -prune -o -path '*/__pycache__' -prune \
    -o -type f \( -name '*.py' -o -name py.typed \) -print | tar -cf - -T - | tar -xf - -C "$CTX/sdk"

# What `import cumulus` needs from outside the standard library (python -X importtime -c
# 'import cumulus'): cloudpickle (function packages, the same version as the client's), msgspec,
# nats-py, nkeys with pynacl, and cffi's `_cffi_backend` that pynacl loads. Nothing else: the
# services' dependencies (docker, aiosqlite, OpenTelemetry, prometheus) stay out of the image.
DISTS="cloudpickle msgspec nats-py nkeys pynacl cffi"

# The base image's Python, for wheels that fit it (remembered per base image ID).
WHEELS=${CUMULUS_IMAGE_WHEELS:-/var/cache/cumulus/wheels}
mkdir -p "$WHEELS"
INFO="$WHEELS/.python-of-${BASE_ID#sha256:}"
if [ ! -s "$INFO" ]; then
    timeout 60 docker run --rm --network none --entrypoint python3 "$BASE" -c \
        'import platform, sys; print("%d.%d" % sys.version_info[:2], platform.machine(), platform.libc_ver()[1] or "-")' \
        >"$INFO.tmp" && mv "$INFO.tmp" "$INFO" || { say "no python3 in $BASE"; exit 1; }
fi
read -r PYV ARCH GLIBC <"$INFO"
ABI="cp${PYV/./}"
CACHE="$WHEELS/$ABI-$ARCH-glibc$GLIBC"
mkdir -p "$CACHE"
PLATFORMS=()
if [ "$GLIBC" != - ]; then
    for n in $(seq "${GLIBC#2.}" -1 17); do PLATFORMS+=(--platform "manylinux_2_${n}_$ARCH"); done
    PLATFORMS+=(--platform "manylinux2014_$ARCH")
fi

# A Python with pip, for `pip download` with this machine's pip configuration.
PIP=""
for py in python3 .venv/bin/python; do
    if command -v "$py" >/dev/null 2>&1 && "$py" -m pip --version >/dev/null 2>&1; then PIP=$py; break; fi
done
if [ -z "$PIP" ] && python3 -m venv "$CTX/venv" >/dev/null 2>&1; then PIP="$CTX/venv/bin/python"; fi
# Where the client's versions are installed (pins, and the copy when there is no index): the
# checkout's .venv (scripts/install.sh), or $CUMULUS_SDK_PYTHON. Never another Python's
# site-packages: a cloudpickle older than the client's cannot load its functions. Without one,
# the index's newest, which is what a fresh install of the SDK gets.
LOCAL=""
for py in ${CUMULUS_SDK_PYTHON:-} .venv/bin/python; do
    if [ -x "$py" ] || command -v "$py" >/dev/null 2>&1; then LOCAL=$py; break; fi
done
VERSIONS=""
[ -z "$LOCAL" ] || VERSIONS=$("$LOCAL" - $DISTS <<'PY' 2>/dev/null || true
import importlib.metadata as md, sys
for name in sys.argv[1:]:
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        pass
PY
)

download() { # SPEC DIR: a wheel for the image's Python into DIR (binary only, no deps)
    [ -n "$PIP" ] && timeout 120 "$PIP" -m pip download --quiet --disable-pip-version-check \
        --only-binary :all: --no-deps --python-version "$PYV" --implementation cp \
        --abi "$ABI" --abi abi3 --abi none "${PLATFORMS[@]}" -d "$2" "$1" >/dev/null 2>&1
}
cached() { # NAME VERSION: the cached wheel's path, if any
    find "$CACHE" -maxdepth 1 -iname "$(echo "$1" | tr - _)-$2-*.whl" | LC_ALL=C sort | head -1
}
copy_local() { # NAME: copy the installed distribution's files into vendor/ (its Python must be
    # the image's where it has compiled parts)
    [ -n "$LOCAL" ] && "$LOCAL" - "$CTX/vendor" "$1" "$PYV" <<'PY'
import importlib.metadata as md, os, shutil, sys
dest, name, image_python = sys.argv[1:]
dist = md.distribution(name)
files = [f for f in dist.files or [] if f.parts[0] != ".." and "__pycache__" not in f.parts]
here = "%d.%d" % sys.version_info[:2]
if here != image_python and any(str(f).endswith(".so") for f in files):
    sys.exit(f"{name} is compiled for Python {here}, the image has {image_python}")
for f in files:
    src = str(f.locate())
    if os.path.isfile(src):
        os.makedirs(os.path.dirname(os.path.join(dest, str(f))), exist_ok=True)
        shutil.copy2(src, os.path.join(dest, str(f)))
print(dist.version)
PY
}

for dist in $DISTS; do
    version=$(echo "$VERSIONS" | awk -v d="$dist" '$1 == d {print $2}')
    wheel=""
    if [ -n "$version" ]; then
        wheel=$(cached "$dist" "$version")
        if [ -z "$wheel" ] && [ ! -e "$CACHE/$dist-$version.nowheel" ]; then
            download "$dist==$version" "$CACHE" || touch "$CACHE/$dist-$version.nowheel"
            wheel=$(cached "$dist" "$version")
        fi
    fi
    if [ -n "$wheel" ]; then
        cp "$wheel" "$CTX/wheels/"
        say "$dist: $(basename "$wheel")"
    elif [ -n "$version" ] && got=$(copy_local "$dist" 2>/dev/null); then
        say "$dist $got: copied from the installation of $LOCAL (no wheel of that version from the index)"
    elif download "$dist" "$CTX/wheels"; then
        say "$dist: $(cd "$CTX/wheels" && ls | grep -i "^$(echo "$dist" | tr - _)-") (the index's newest; not installed here)"
    elif [ -n "$PIP" ] && mkdir -p "$CTX/built" && timeout 300 "$PIP" -m pip wheel --quiet \
            --disable-pip-version-check --no-deps -w "$CTX/built" "$dist${version:+==$version}" >/dev/null 2>&1 \
        && wheel=$(find "$CTX/built" -iname "$(echo "$dist" | tr - _)-*-none-any.whl" | head -1) && [ -n "$wheel" ]; then
        # Pure Python with only a source distribution on the index (nkeys): a wheel built here.
        cp "$wheel" "$CACHE/" && mv "$wheel" "$CTX/wheels/" && rm -rf "$CTX/built"
        say "$dist: $(basename "$wheel") (built from the index's source distribution)"
    else
        say "$dist: no wheel on the index for Python $PYV ($ARCH) and none installed here"
        exit 1
    fi
done

HASH=$( (echo "$BASE $BASE_ID $TAG"; \
         cd "$CTX" && find . -path ./venv -prune -o -type f -print | LC_ALL=C sort | xargs sha256sum) \
        | sha256sum | cut -c1-16)
if [ "$FORCE" = 0 ] && [ "$(docker image inspect --format '{{index .Config.Labels "cumulus.inputs"}}' "$TAG" 2>/dev/null)" = "$HASH" ]; then
    say "$TAG is up to date (inputs $HASH)"
    docker image inspect --format '{{.Id}}' "$TAG"
    exit 0
fi
rm -rf "$CTX/venv"
t=$(date +%s.%N)
DOCKER_BUILDKIT=0 timeout 600 docker build --quiet --build-arg "BASE=$BASE" --build-arg "IMAGE=$TAG" \
    --label "cumulus.inputs=$HASH" -t "$TAG" "$CTX" >/dev/null
say "built $TAG FROM $BASE in $(awk -v a="$t" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1fs", b-a}')"

# As a job runs: nobody, no network, read-only. Importing the SDK starts nothing (no thread,
# no process, no connection) and needs nothing the image lacks.
out=$(timeout 60 docker run --rm --network none --read-only --entrypoint python3 "$TAG" -c '
import os, threading
import cloudpickle, job_image.runner, cumulus
assert threading.active_count() == 1, threading.enumerate()
assert [p for p in os.listdir("/proc") if p.isdigit()] == [str(os.getpid())]
print(os.getuid(), 2 + 2)')
[ "$out" = "65534 4" ] || { say "smoke test failed: got '$out'"; exit 1; }
say "smoke test ok (user $(docker image inspect --format '{{.Config.User}}' "$TAG"), import cumulus)"
docker image inspect --format '{{.Id}}' "$TAG"
