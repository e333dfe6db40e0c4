#!/usr/bin/env bash
# Install what the test suite needs, idempotently, on Debian 12:
#   1. Debian packages (only if some are missing; `apt-get update` first then),
#      without letting their services start (docker-registry, dockerd, munged, slurmctld and
#      slurmd are started by the tests);
#   2. a virtualenv at <repo>/.venv made with /usr/bin/python3 (usable by non-root users)
#      with `pip install -e '.[test,docs]'`.
# Run as root, or as a user with sudo. Safe to run again: it only does what is missing.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$repo/.venv"
packages=(git git-annex proot fakechroot patchelf runc docker-registry skopeo umoci oci-image-tool docker.io
          busybox-static zstd apache2-utils python3 python3-venv slurm-wlm munge)
services=(docker-registry docker docker.socket containerd munge slurmctld slurmd)

say() { printf 'install.sh: %s\n' "$*"; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo -n "$@" || sudo "$@"
    else say "ERROR: need root (or sudo) for: $*"; exit 1
    fi
}

missing=()
for p in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done

if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    # Forbid service starts during installation (no systemd here; invoke-rc.d honours this).
    own_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        as_root sh -c 'printf "#!/bin/sh\nexit 101\n" > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d'
        own_policy=1
    fi
    cleanup_policy() { if [ "$own_policy" = 1 ]; then as_root rm -f /usr/sbin/policy-rc.d; fi; }
    trap cleanup_policy EXIT
    say "apt-get update and install (waiting for any other apt process to finish)"
    as_root bash "$repo/tools/apt-install.sh" "${missing[@]}"
    say "installed: ${missing[*]}"
    cleanup_policy
    trap - EXIT
else
    say "Debian packages: all present"
fi

# The tests start their own registry/engine on private ports and sockets: make sure no
# packaged service runs or starts at boot (best effort; quiet when there is nothing to do).
for s in "${services[@]}"; do
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        if systemctl is-enabled --quiet "$s" 2>/dev/null || systemctl is-active --quiet "$s" 2>/dev/null; then
            say "disabling service $s"
            as_root systemctl disable --now "$s" >/dev/null 2>&1 || true
        fi
    elif [ -x "/etc/init.d/$s" ]; then
        if as_root service "$s" status >/dev/null 2>&1; then
            say "stopping service $s"
            as_root service "$s" stop >/dev/null 2>&1 || true
        fi
        as_root update-rc.d "$s" disable >/dev/null 2>&1 || true
    fi
done

# The venv must use the system interpreter: a pyenv python under /root is unusable by
# the non-root test user.
if [ -x "$venv/bin/python" ] && ! grep -qx 'home = /usr/bin' "$venv/pyvenv.cfg" 2>/dev/null; then
    say "recreating $venv (it was not made with /usr/bin/python3)"
    rm -rf "$venv"
fi
if [ ! -x "$venv/bin/python" ]; then
    say "creating $venv with /usr/bin/python3"
    /usr/bin/python3 -m venv "$venv"
fi

stamp="$venv/.datalad-udocker-install"
want=$(cat "$repo/pyproject.toml" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null || true)" = "$want" ] \
        && "$venv/bin/python" -c 'import datalad_udocker, pytest, datalad, udocker' 2>/dev/null; then
    say "venv: up to date"
else
    say "pip install -e '.[test,docs]' into $venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$repo[test,docs]"
    echo "$want" > "$stamp"
fi
chmod -R a+rX "$venv"

# Non-root users must reach the venv and the sources: warn if a parent directory blocks them.
d="$repo"
while [ "$d" != "/" ]; do
    if (( (8#$(stat -c %a "$d") & 1) == 0 )); then
        say "WARNING: $d is not traversable by other users; non-root tests will fail (chmod o+x)"
    fi
    d=$(dirname "$d")
done
say "done"
