#!/usr/bin/env bash
# apt-get update, then apt-get install PACKAGE..., as root, non-interactively.
#
# Another apt or dpkg process (unattended-upgrades, apt-daily, a second terminal) may hold
# apt's locks: wait for it, up to APT_LOCK_WAIT seconds (default 600), saying so once,
# instead of failing at once.  apt-get install waits by itself (DPkg::Lock::Timeout);
# apt-get update does not honour that setting, so it is tried again while its lock is held.
set -euo pipefail
wait_s=${APT_LOCK_WAIT:-600}
export DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1
say() { printf 'apt-install.sh: %s\n' "$*"; }

deadline=$((SECONDS + wait_s))
said=
until out=$(apt-get -qq -o DPkg::Lock::Timeout="$wait_s" update 2>&1); do
    if [[ $out == *"Could not get lock"* ]] && (( SECONDS < deadline )); then
        [ -n "$said" ] || say "waiting for another apt process to release its lock (${out%%$'\n'*})"
        said=1
        sleep 2
        continue
    fi
    printf '%s\n' "$out" >&2
    exit 1
done

# -q (not -qq) so that apt says "Waiting for cache lock ... held by process N (NAME)"; only
# that line is shown, once, at once (stdbuf: apt buffers its output to a pipe)
stdbuf -oL apt-get -q -o DPkg::Lock::Timeout="$wait_s" install -y --no-install-recommends "$@" \
    | while IFS= read -r line; do
        if [[ $line == "Waiting for cache lock"* && -z "${shown:-}" ]]; then say "$line"; shown=1; fi
    done
