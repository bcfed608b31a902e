#!/usr/bin/env bash
# `make arm64-check`: the Raspberry Pi install notes, run on a Debian arm64 root under
# qemu-user emulation, with no Pi. It builds the root once (debootstrap), installs edgefed
# there as README's notes say (a venv, torch's aarch64 CPU wheel first, then edgefed from this
# checkout with the locked versions), and runs one arm64 agent with the tiny model against an
# aggregator on this host's broker until one update is accepted. Needs root, Debian's
# debootstrap and qemu-user-static (installed when missing), and PyPI; slow, so not in CI.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
ROOT=${ARM64_ROOT:-/var/tmp/edgefed-arm64}
BROKER=${BROKER:-mqtt://127.0.0.1:1883}
HOST_EDGEFED=${HOST_EDGEFED:-$REPO/.venv/bin/edgefed}
FEDERATION=arm64-check-$$
started=$(date +%s)
say() { echo "[arm64-check $(( $(date +%s) - started ))s] $*"; }

[ "$(id -u)" = 0 ] || { echo "arm64-check needs root (debootstrap, chroot)"; exit 2; }
[ -x "$HOST_EDGEFED" ] || { echo "no $HOST_EDGEFED: run make first"; exit 2; }
command -v debootstrap >/dev/null && [ -x /usr/bin/qemu-aarch64-static ] \
  || apt-get install -y -q debootstrap qemu-user-static
# The kernel runs arm64 programs through qemu once the handler is registered.
[ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] \
  || cat /usr/lib/binfmt.d/qemu-aarch64.conf > /proc/sys/fs/binfmt_misc/register

if [ ! -x "$ROOT/usr/bin/python3" ]; then
  say "building a Debian bookworm arm64 root in $ROOT"
  debootstrap --arch=arm64 --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates bookworm "$ROOT" \
    http://deb.debian.org/debian
fi
cleanup() {
  for m in proc sys dev; do umount "$ROOT/$m" 2>/dev/null || true; done
  [ -n "${AGG_PID:-}" ] && kill "$AGG_PID" 2>/dev/null || true
}
trap cleanup EXIT
mount -t proc proc "$ROOT/proc"
mount --bind /dev "$ROOT/dev"
mount --bind /sys "$ROOT/sys"  # torch reads the CPU list there
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
# The host's trusted CAs (a TLS proxy's included) for pip, and none of its pip settings.
cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"
unset PIP_FIND_LINKS PIP_CONSTRAINT
say "$(chroot "$ROOT" uname -m), $(chroot "$ROOT" python3 --version)"

# This checkout, as committed, and the locked versions without their x86 hashes.
rm -rf "$ROOT/opt/edgefed/src" && mkdir -p "$ROOT/opt/edgefed/src"
git -C "$REPO" archive HEAD | tar -x -C "$ROOT/opt/edgefed/src"
sed -nE 's/^([A-Za-z0-9._-]+==[^ ]+).*/\1/p' "$REPO/requirements/lock.txt" \
  > "$ROOT/opt/edgefed/constraints.txt"
if [ ! -x "$ROOT/opt/edgefed/venv/bin/edgefed" ]; then
  say "installing into /opt/edgefed/venv: torch first, then edgefed"
  chroot "$ROOT" python3 -m venv /opt/edgefed/venv
  chroot "$ROOT" /opt/edgefed/venv/bin/pip install --quiet "$(grep '^torch==' "$REPO/requirements/torch.txt")"
  chroot "$ROOT" /opt/edgefed/venv/bin/pip install --quiet -c /opt/edgefed/constraints.txt /opt/edgefed/src
fi
# This checkout's edgefed every time (the host's aggregator runs it too); its dependencies stay.
chroot "$ROOT" /opt/edgefed/venv/bin/pip install --quiet --no-deps --force-reinstall /opt/edgefed/src
chroot "$ROOT" /opt/edgefed/venv/bin/python -c \
  'import platform, torch; print("torch", torch.__version__, "on", platform.machine())'

say "aggregator on this host ($BROKER), federation $FEDERATION"
EDGEFED_STRATEGY__BUFFER_SIZE=1 "$HOST_EDGEFED" aggregator --broker "$BROKER" --federation "$FEDERATION" --max-versions 1 \
  --json-out "$ROOT/tmp/arm64-check.json" > "$ROOT/tmp/arm64-aggregator.log" 2>&1 &
AGG_PID=$!
say "one arm64 agent (tiny model) until one update is accepted"
chroot "$ROOT" env OMP_NUM_THREADS=1 timeout 1200 /opt/edgefed/venv/bin/edgefed -v agent \
  --broker "$BROKER" --federation "$FEDERATION" --client-id pi-arm64 \
  --data synthetic:n=32,seed=1 --max-updates 1 --state-dir /tmp/arm64-agent
wait "$AGG_PID"
AGG_PID=
python3 - "$ROOT/tmp/arm64-check.json" <<'PY'
import json, sys
results = json.load(open(sys.argv[1]))
accepted = [u for u in results["updates"] if u["accepted"] and u["client_id"] == "pi-arm64"]
assert accepted, results["updates"]
print(f"accepted update {accepted[0]['update_id']} from the arm64 agent; "
      f"version {results['history'][-1]['version']}")
PY
say "passed"
