#!/bin/sh
# The job container's entry point: the in-job runner, unable to gain privileges (setuid
# binaries stay powerless). Swarm has no no-new-privileges option before API 1.46, so the job
# sets it itself here (and the runner again with prctl, for images without setpriv).
set -e
if command -v setpriv >/dev/null 2>&1; then
    exec setpriv --no-new-privs python3 -m job_image.runner "$@"
fi
exec python3 -m job_image.runner "$@"
