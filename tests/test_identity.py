"""Who the command runs as (issue 9 item 6): the image's ``User`` (default root), as under
``docker run``, where the mode can; ``HOME`` is that user's home in the image's /etc/passwd.

Busybox images whose /etc/passwd has a non-root user ``app`` (uid 1000, home /home/app), run
as the non-root caller through ``datalad-udocker-run`` in every mode.  What each mode gives is
documented in docs/runtime.rst (the guarantees table).
"""
from __future__ import annotations

import shutil

import pytest

from fixtures import images as im
from test_runtime import api, build, run_cli

PASSWD = (b"root:x:0:0:root:/root:/bin/sh\n"
          b"app:x:1000:1001:app:/home/app:/bin/sh\n"
          b"nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
GROUP = b"root:x:0:\napp:x:1001:\nnogroup:x:65534:\n"
PROBE = 'echo "$(id -u) $(id -g) $HOME"'
USERS = {"default": None, "name": "app", "uid": "1000", "uidgid": "1000:1001",
         "unknown": "4242"}


@pytest.fixture(scope="module")
def user_images(nonroot):
    root = nonroot.make_tempdir("udtest-identity-")
    spec = im.busybox_rootfs(extra={"etc/passwd": PASSWD, "etc/group": GROUP,
                                    "home/app": im.Dir(0o755)})
    layer = im.make_layer(spec)
    images = {key: build(root, key, [layer], cmd=["/bin/sh"],
                         **({"user": user} if user else {}))
              for key, user in USERS.items()}
    images["envhome"] = build(root, "envhome", [layer], cmd=["/bin/sh"], user="app",
                              env=["PATH=/bin", "HOME=/from-image"])
    yield images
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def module_udir(nonroot):
    base = nonroot.make_tempdir("udtest-udocker-")
    yield base / "udocker"
    shutil.rmtree(base, ignore_errors=True)


# what docker run gives (uid, gid, HOME): a user not in /etc/passwd gets gid 0 and HOME=/
DOCKER = {"default": ("0", "0", "/root"), "name": ("1000", "1001", "/home/app"),
          "uid": ("1000", "1001", "/home/app"), "uidgid": ("1000", "1001", "/home/app"),
          "unknown": ("4242", "0", "/")}


def expected(key, mode, nonroot):
    uid, gid, home = DOCKER[key]
    if mode == "F1":                    # Fakechroot fakes no identity: the caller's
        return str(nonroot.uid), str(nonroot.gid), home
    if mode == "R1":                    # one uid (0) in runc's rootless user namespace
        return "0", "0", home
    if key == "unknown":                # udocker makes the user, with the caller's gid
        return uid, str(nonroot.gid), home
    return uid, gid, home


@pytest.mark.parametrize("mode", ["P1", "P2", "F1", "R1"])
@pytest.mark.parametrize("key", list(USERS))
def test_user_and_home_as_docker_run(nonroot, module_udir, user_images, key, mode):
    res = run_cli(nonroot, module_udir, user_images[key], "sh", "-c", PROBE, mode=mode)
    assert (res.returncode, res.stderr) == (0, ""), res.stderr
    assert tuple(res.stdout.split()) == expected(key, mode, nonroot)


@pytest.mark.parametrize("mode", ["P1", "F1"])
def test_home_from_env_wins(nonroot, module_udir, user_images, mode):
    """HOME set by the caller (or the image's Env) is kept, as under docker run."""
    got = api(nonroot, module_udir, (
        "import json; from datalad_udocker.run.runtime import run_image\n"
        f"code, out, err = run_image({str(user_images['name'])!r}, 'sh -c \"echo $HOME\"', "
        f"execmode={mode!r}, env={{'HOME': '/elsewhere'}})\n"
        "print(json.dumps([code, out.decode(), err.decode()]))"))
    assert got == [0, "/elsewhere\n", ""]
    res = run_cli(nonroot, module_udir, user_images["envhome"], "sh", "-c", "echo $HOME",
                  mode=mode)
    assert (res.returncode, res.stdout) == (0, "/from-image\n"), res.stderr
