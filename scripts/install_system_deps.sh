#!/usr/bin/env bash
# Debian packages the project needs outside the venv: a real Slurm cluster for the `slurm` tests
# (munge, slurmctld/slurmd/slurm-client, slurmdbd + MariaDB for accounting so sacct and submitit's
# job status work), Fashion-MNIST for the tiny real-data runs, and curl (webdataset opens http(s) shards with it).
#
# Idempotent and cheap when nothing is missing: it only runs `apt-get update`/`install` when at least
# one package is absent, so CI and `make` can call it unconditionally. Needs root (or sudo) otherwise.
set -euo pipefail

PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server dataset-fashion-mnist curl)

missing=()
for pkg in "${PACKAGES[@]}"; do
    # `dpkg-query` reports "install ok installed" only for fully configured packages.
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    [[ "$status" == "install ok installed" ]] || missing+=("$pkg")
done

if [[ ${#missing[@]} -eq 0 ]]; then
    echo "install_system_deps: all ${#PACKAGES[@]} packages already installed"
    exit 0
fi

SUDO=()
if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || { echo "install_system_deps: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
    SUDO=(sudo)
fi

echo "install_system_deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# Other tools (or a parallel CI step) may hold the apt locks: wait for them instead of failing.
APT_OPTS=(-o DPkg::Lock::Timeout=600)
"${SUDO[@]}" apt-get "${APT_OPTS[@]}" update -qq
# The daemons are started by slurm/local-cluster/up.sh, never by the packages: without systemd their
# maintainer scripts' service starts fail (slurmctld has no slurm.conf yet) and would fail the install.
# Deny them with a temporary policy-rc.d unless the image already has one.
if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee /usr/sbin/policy-rc.d >/dev/null
    "${SUDO[@]}" chmod 755 /usr/sbin/policy-rc.d
    trap '"${SUDO[@]}" rm -f /usr/sbin/policy-rc.d' EXIT
fi
"${SUDO[@]}" apt-get "${APT_OPTS[@]}" install -y -qq --no-install-recommends "${missing[@]}"
echo "install_system_deps: done"
