"""tools/quickstart.sh (tools/install.sh -> tools/apt-install.sh) waits for apt's locks.

Another apt or dpkg process (unattended-upgrades, a second terminal) holding apt's locks
must make the install wait, not fail at once.  The test holds the locks itself, as that other
process would, and runs ``tools/apt-install.sh zstd`` (a package that is installed: once
apt has the locks there is nothing to do) for real: ``apt-get update`` (with no package
sources: nothing is read from the network), then ``apt-get install``.  It runs in a mount namespace with
private lock files, a private copy of the package lists and an empty package cache, so
nothing the machine's own apt uses is locked or written.
"""
from __future__ import annotations

import fcntl
import os
import subprocess
import threading

import pytest

from fixtures.util import REPO_ROOT, stop_process, wait_until

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="apt-get runs as root")]


def hold(path):
    """An exclusive fcntl lock on ``path``, as apt and dpkg take them: the fd."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def test_apt_install_waits_for_the_locks(tmp_path):
    lists = tmp_path / "lists"
    subprocess.run(["cp", "-a", "/var/lib/apt/lists", str(lists)], check=True)
    frontend, dpkg_lock = tmp_path / "lock-frontend", tmp_path / "lock"
    dpkg_lock.touch()
    held = {"lists": hold(lists / "lock"), "frontend": hold(frontend)}
    setup = "; ".join([
        "set -e",
        f"mount --bind {lists} /var/lib/apt/lists",
        "mount -t tmpfs -o size=64m none /var/cache/apt",
        "mkdir -p /var/cache/apt/archives/partial",
        # no package sources: `apt-get update` takes its lock and reads nothing from the net
        "mount -t tmpfs -o size=1m none /etc/apt/sources.list.d",
        "if [ -e /etc/apt/sources.list ]; then mount --bind /dev/null /etc/apt/sources.list; fi",
        f"mount --bind {frontend} /var/lib/dpkg/lock-frontend",
        f"mount --bind {dpkg_lock} /var/lib/dpkg/lock",
        f"exec bash {REPO_ROOT / 'tools' / 'apt-install.sh'} zstd"])
    proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", setup],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()

    def said(words):
        return any(words in ln for ln in lines)

    try:
        try:
            # apt-get update finds its lock held: it waits, says so once, naming the holder
            wait_until(lambda: said("waiting for another apt process"), 120, proc=proc,
                       what="apt-install.sh to wait for the package lists' lock")
            assert f"held by process {os.getpid()}" in "".join(lines), lines
            os.close(held.pop("lists"))
            # apt-get install finds the dpkg frontend lock held: it waits too
            wait_until(lambda: said("Waiting for cache lock"), 120, proc=proc,
                       what="apt-get install to wait for the dpkg lock")
        except RuntimeError as exc:
            raise AssertionError(f"{exc}\noutput: {''.join(lines)}") from None
        assert proc.poll() is None
        os.close(held.pop("frontend"))
        assert proc.wait(timeout=120) == 0, "".join(lines)
        reader.join(timeout=10)
        waits = [ln for ln in lines if "aiting for" in ln]
        assert len(waits) == 2, lines                       # each wait said once
    finally:
        for fd in held.values():
            os.close(fd)
        stop_process(proc)
