#!/usr/bin/env bash
# Debian packages the test suite needs: Slurm + munge (the slurm backend's tests run a real
# single-node cluster, see infra/slurm/cluster.sh) and chromium + its driver (the Prefect UI tests).
# Idempotent: a fast no-op when everything is installed; `apt-get update` only when something is missing.
# Runs as root, or through sudo when that is available.
set -euo pipefail

PACKAGES=(slurm-wlm munge chromium chromium-driver)

installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}

missing=()
for p in "${PACKAGES[@]}"; do
    installed "$p" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "system-packages: missing ${missing[*]} and no apt-get here (not Debian/Ubuntu?); install them by hand" >&2
    exit 1
fi
if [ "$(id -u)" -eq 0 ]; then
    as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    as_root=(sudo -n)
else
    echo "system-packages: missing ${missing[*]}; needs root or passwordless sudo to install them" >&2
    exit 1
fi

echo "system-packages: installing ${missing[*]}"
# Package scripts must not start system-wide munged/slurmctld/slurmd: the tests run their own, under
# their own socket and folder. A policy-rc.d that denies starts does that on hosts without one.
policy=/usr/sbin/policy-rc.d
added_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | "${as_root[@]}" tee "$policy" >/dev/null
    "${as_root[@]}" chmod 755 "$policy"
    added_policy=1
fi
cleanup() {
    if [ "$added_policy" = 1 ]; then "${as_root[@]}" rm -f "$policy"; fi
}
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${missing[@]}" >/dev/null
echo "system-packages: done"
