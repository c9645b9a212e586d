#!/usr/bin/env bash
# Smoke test of the CPU Docker image without a Docker engine (not part of CI).
#
#   1. debootstrap a Debian bookworm rootfs and `podman import` it as localhost/unmask-debian-base:bookworm
#      (no container registry is reachable here, so the base image is made locally);
#   2. `podman build --isolation=chroot` the CPU image from ./Dockerfile on that base, with the local CPU torch
#      wheel in the build context (what `pip install torch==2.13.0` resolves to on this machine);
#   3. `buildah from` the image and `buildah run --isolation=chroot --network=host` its entrypoint
#      (`unmask serve --host 0.0.0.0`) on a free port, wait for /health, send a chat completion through the
#      unmask_client SDK, check the bundled model's answer, stop the server.
#
# Usage: benchmarks/docker_smoke.sh [--fresh] [--base-only] [--log FILE]
#   --fresh: remove the base image and the image first and build without the layer cache (everything from scratch)
# Environment: WORK (scratch dir, default /tmp/unmask-docker-smoke), MIRROR (Debian mirror), PORT (default 18000).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WORK=${WORK:-/tmp/unmask-docker-smoke}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
PORT=${PORT:-18000}
BASE=localhost/unmask-debian-base:bookworm
IMAGE=localhost/unmask:cpu
BASE_ONLY=0
FRESH=0
LOG=""
while [ $# -gt 0 ]; do
  case "$1" in
    --base-only) BASE_ONLY=1 ;;
    --fresh) FRESH=1 ;;
    --log) LOG=$2; shift ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done
if [ -n "$LOG" ]; then exec > >(tee "$LOG") 2>&1; fi
step() { echo; echo "== $(date -u +%H:%M:%S) $*"; }
mkdir -p "$WORK"
echo "docker smoke test, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), commit $(git rev-parse --short HEAD)$(git diff --quiet || echo ' (dirty)')"
echo "host: $(. /etc/os-release; echo "$PRETTY_NAME"), $(podman --version), $(buildah --version | cut -d' ' -f1-3)"

if [ "$FRESH" = 1 ]; then
  step "--fresh: removing $IMAGE and $BASE, building without cache"
  podman rmi -f "$IMAGE" "$BASE" >/dev/null 2>&1 || true
fi
# 1. base image ------------------------------------------------------------------------------------------------
if podman image exists "$BASE"; then
  step "base image $BASE exists, reused"
else
  step "debootstrap Debian bookworm (minbase + python3) from $MIRROR"
  rm -rf "$WORK/rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$WORK/rootfs" "$MIRROR" > "$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log"; exit 1; }
  tail -1 "$WORK/debootstrap.log"
  rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb "$WORK/rootfs/var/lib/apt/lists/"*
  step "podman import -> $BASE"
  tar -C "$WORK/rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$BASE"
fi
podman image ls "$BASE"
[ "$BASE_ONLY" = 1 ] && exit 0

# 2. CPU image ------------------------------------------------------------------------------------------------
step "how this machine resolves torch==2.13.0 (the image installs the same wheel)"
pip config list 2>/dev/null | grep -E 'index|find-links|constraint' || true
rm -f benchmarks/docker/wheels/*.whl
pip download torch==2.13.0 --no-deps -d benchmarks/docker/wheels 2>&1 | grep -E 'Processing|Downloading|Saved' || true
ls -l benchmarks/docker/wheels/*.whl
# pip here reaches PyPI through a TLS proxy whose CA is in pip's `cert` setting: the build's pip uses the same
mkdir -p benchmarks/docker/certs
CERT=${PIP_CERT:-$(pip config list 2>/dev/null | sed -nE "s/^[^=]*\.cert='(.*)'$/\1/p" | head -1)}
if [ -n "$CERT" ] && [ -s "$CERT" ]; then cp "$CERT" benchmarks/docker/certs/ca-bundle.crt; echo "pip cert: $CERT (copied for the build)"; fi
step "podman build --isolation=chroot (DEVICE=cpu, BASE_IMAGE=$BASE) -> $IMAGE"
# TORCH_INDEX_URL is emptied: download.pytorch.org does not resolve here; the CPU wheel comes from benchmarks/docker/wheels
# and everything else from PyPI, as for `pip install torch==2.13.0` on the host.
t0=$(date +%s)
podman --cgroup-manager=cgroupfs build --isolation=chroot --network=host --format docker $([ "$FRESH" = 1 ] && echo --no-cache) \
  --build-arg DEVICE=cpu --build-arg BASE_IMAGE="$BASE" --build-arg TORCH_INDEX_URL= \
  -t "$IMAGE" -f Dockerfile . 2>&1 | grep --line-buffered -vE '^(Collecting|Downloading|  Downloading|Requirement already|Using cached|  Obtaining|  Preparing|  Building|  Installing|  Getting|  Created|  Stored| +━)' \
  | sed -u -E 's/^(Successfully installed .{0,300}).*/\1 .../'
rm -f benchmarks/docker/wheels/*.whl benchmarks/docker/certs/ca-bundle.crt
echo "build took $(( $(date +%s) - t0 ))s"
podman image ls "$IMAGE"
echo "entrypoint: $(podman image inspect --format '{{json .Config.Entrypoint}}' "$IMAGE")"
echo "user: $(podman image inspect --format '{{.Config.User}}' "$IMAGE"), exposed: $(podman image inspect --format '{{json .Config.ExposedPorts}}' "$IMAGE"), volumes: $(podman image inspect --format '{{json .Config.Volumes}}' "$IMAGE")"
echo "healthcheck: $(podman image inspect --format '{{json .Config.Healthcheck}}' "$IMAGE")"

# 3. run the entrypoint ---------------------------------------------------------------------------------------
step "buildah from $IMAGE; buildah run --isolation=chroot --network=host: the entrypoint, on port $PORT"
CTR=$(buildah from "$IMAGE")
SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then kill -TERM "$SERVER_PID" 2>/dev/null || true; fi
  buildah rm "$CTR" >/dev/null 2>&1 || true
}
trap cleanup EXIT
ENTRY=$(podman image inspect --format '{{range .Config.Entrypoint}}{{.}} {{end}}' "$IMAGE")
echo "container $CTR; runs: $ENTRY--port $PORT (docker run IMAGE --port $PORT)"
buildah run --isolation=chroot --network=host "$CTR" -- $ENTRY --port "$PORT" > "$WORK/server.log" 2>&1 &
SERVER_PID=$!
step "waiting for /health, then a chat completion through unmask_client (host side)"
PYTHONPATH="$REPO/clients/python" python - "$PORT" <<'PY'
import sys, time
from unmask_client import Client

port = int(sys.argv[1])
with Client(f"http://127.0.0.1:{port}", read_timeout=120) as c:
    t0 = time.monotonic()
    c.wait_until_ready(timeout=300)
    print(f"/health 200 after {time.monotonic() - t0:.1f}s; version {c.version()}; models {[m.id for m in c.models()]}")
    cases = {"sort 3 1 2": "1 2 3", "reverse 5 9 7 1": "1 7 9 5", "sort 8 6 4 2 0": "0 2 4 6 8"}
    for question, expected in cases.items():
        r = c.chat([{"role": "user", "content": question}], temperature=0, cache="dual", threshold=0.9)
        ok = r.text.strip() == expected
        print(f"chat {question!r} -> {r.text!r} ({'ok' if ok else 'WRONG, expected ' + repr(expected)}); "
              f"usage {r.usage.completion_tokens} tokens; diffusion {r.diffusion}")
        assert ok
    chunks = [ch.text for ch in c.chat([{"role": "user", "content": "reverse 1 2 3 4"}], stream=True, block_length=4)]
    print(f"stream deltas {chunks!r}")
    assert "".join(chunks).strip() == "4 3 2 1"
PY
step "HEALTHCHECK command inside the container (image's port replaced by $PORT)"
HC_JSON=$(podman image inspect --format '{{json .Config.Healthcheck.Test}}' "$IMAGE")
echo "HEALTHCHECK test: $HC_JSON"
mapfile -t HC < <(python -c 'import json, sys; t = json.loads(sys.argv[1]); assert t[0] == "CMD", t
print("\n".join(a.replace(":8000", ":" + sys.argv[2]) for a in t[1:]))' "$HC_JSON" "$PORT")
buildah run --isolation=chroot --network=host "$CTR" -- "${HC[@]}" && echo "healthcheck: exit 0"
step "the CPU C kernels inside the container: built into the image, no compiler left"
buildah run --isolation=chroot --network=host "$CTR" -- sh -c 'command -v cc gcc || echo "no C compiler"'
buildah run --isolation=chroot --network=host "$CTR" -- python -c "from engine.model import cpu_kernel
assert cpu_kernel.available(), 'C kernels unavailable'; print('C kernels: isa', cpu_kernel.isa(), 'from', list((cpu_kernel._cache_dir()).glob('*.so')))"
step "whoami inside the container"
buildah run --isolation=chroot --network=host "$CTR" -- python -c "import getpass, os; print(getpass.getuser(), os.getuid())"
step "stop: SIGTERM to the server process (as docker stop does); buildah run ends when it exits"
SRV=$(ss -ltnpH "sport = :$PORT" | sed -nE 's/.*pid=([0-9]+).*/\1/p' | head -1)
echo "server pid $SRV (uid $(ps -o uid= -p "$SRV" | tr -d " "): $(ps -o args= -p "$SRV"))"
kill -TERM "$SRV"
for _ in $(seq 1 60); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 1; done
if kill -0 "$SERVER_PID" 2>/dev/null; then echo "server still running 60s after SIGTERM" >&2; exit 1; fi
set +e; wait "$SERVER_PID"; RC=$?; set -e
echo "server exit status (through buildah run): $RC"
echo "--- server log ---"
cat "$WORK/server.log"
echo "--- end ---"
[ "$RC" = 0 ] || { echo "FAILED: the server did not exit 0 on SIGTERM" >&2; exit 1; }
step "docker smoke test passed"
