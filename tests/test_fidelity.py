"""Fidelity of the PRoot modes P1 and P2: the container's files, Docker's exit status.

Debian 12's PRoot 5.1.0 does not translate ``statx`` or ``faccessat2``: without
our launcher (``datalad_udocker/run/proot_launch.py``) GNU coreutils inside the
container see the HOST's file at the same path.  The image here is built so
that its files differ from the host's (a marker at the host's perl path with
another size and mode, no ``/etc/debian_version``), with GNU coreutils and
their libraries copied in, and every command runs as the non-root user
through the real ``datalad-udocker-run`` CLI.
"""
from __future__ import annotations

import shutil

import pytest

from fixtures import images as im
from fixtures.differing import MARKER, differing_rootfs, shadowed_host_file
from fixtures.users import udocker_dir_fixture  # noqa: E402
from test_runtime import build, run_cli

MODES = ["P1", "P2"]


@pytest.fixture(scope="module")
def host_file():
    """A host file the image shadows with MARKER (another size and mode)."""
    return shadowed_host_file()


@pytest.fixture(scope="module")
def image(nonroot, host_file):
    root = nonroot.make_tempdir("udtest-fidelity-")
    yield build(root, "coreutils", [im.make_layer(differing_rootfs(host_file))],
                cmd=["/bin/sh"], env=["PATH=/bin"])
    shutil.rmtree(root, ignore_errors=True)


udir = udocker_dir_fixture("module")


@pytest.mark.parametrize("mode", MODES)
def test_file_metadata_is_the_containers(nonroot, udir, image, host_file, mode):
    home_file = nonroot.home / ".gitconfig"
    assert home_file.exists()
    probe = (f"stat -c '%s %a' {host_file}\n"
             "mkdir -p /opt/new && ls -d /opt/new\n"
             "touch /opt/new/prog && chmod +x /opt/new/prog\n"
             "[ -x /opt/new/prog ] && echo shell-test-x\n"
             "/bin/test -x /opt/new/prog && echo coreutils-test-x\n"
             "mv /opt/new/prog /opt/new/moved && ls /opt/new\n"
             f"stat -c %s {home_file} /etc/debian_version; echo host-only=$?\n")
    res = run_cli(nonroot, udir, image, "sh", "-c", probe, mode=mode)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        f"{len(MARKER.data)} 640", "/opt/new", "shell-test-x", "coreutils-test-x",
        "moved", "host-only=1"]
    # the host-only paths are not found, and stat said so with GNU's messages
    assert res.stderr.count("No such file or directory") == 2, res.stderr
    assert "proot" not in res.stderr


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("script,code", [
    ("kill -SEGV $$", 139),
    ("kill -TERM $$", 143),
    # PRoot alone reports the last normal exit (here /bin/true's 0) or 255
    ("/bin/true; kill -SEGV $$", 139),
    ("/bin/true; exit 255", 255),
])
def test_signal_exit_status_is_dockers(nonroot, udir, image, mode, script, code):
    res = run_cli(nonroot, udir, image, "sh", "-c", script, mode=mode)
    assert (res.returncode, res.stdout, res.stderr) == (code, "", "")


@pytest.mark.parametrize("mode", MODES)
def test_stderr_is_the_commands_own(nonroot, udir, image, mode):
    # an ordinary broken pipe: PRoot says "terminated with signal 13" for yes
    res = run_cli(nonroot, udir, image, "sh", "-c", "yes | head -1", mode=mode)
    assert (res.returncode, res.stdout, res.stderr) == (0, "y\n", "")
    # the command's stderr passes through unchanged, even without a newline
    res = run_cli(nonroot, udir, image, "sh", "-c",
                  "echo err >&2; printf 'proot-like but not info' >&2; exit 4",
                  mode=mode)
    assert (res.returncode, res.stdout, res.stderr) == (
        4, "", "err\nproot-like but not info")


def test_launcher_reads_both_proot_formats(tmp_path):
    """PRoot 5.1 names processes by host pid (the command usually ends last), PRoot >= 5.2
    (udocker's own builds) by vpid, 1 being the command, and kills the rest after it."""
    from datalad_udocker.run.proot_launch import StderrFilter
    out = tmp_path / "stderr"
    with open(out, "wb") as f:
        filt = StderrFilter(f.fileno())
        for chunk in (b"err", b"or\nproot", b" info: vpid 2: exited with status 0\n",
                      b"partial ", b"proot info: vpid 1: terminated with signal 11\n",
                      b"proot info: vpid 3: terminated with signal 9\nlast"):
            filt.feed(chunk)
        filt.close()
        assert filt.status(255) == 139
    assert out.read_bytes() == b"error\npartial last"
    with open(out, "wb") as f:
        filt = StderrFilter(f.fileno())
        filt.feed(b"proot info: pid 41: terminated with signal 13\n"
                  b"proot info: binding = /etc/host.conf\n"
                  b"proot info: pid 40: exited with status 3\n")
        filt.close()
        assert filt.status(3) == 3
    assert out.read_bytes() == b""
