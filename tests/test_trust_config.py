"""A stranger's dataset cannot steer security or host settings; deletes stay in udocker's dir.

* A dataset that commits ``datalad.udocker.insecure-registries=<remote host>`` and registers
  ``http://`` layer URLs for it, cloned by a user whose ``~/.docker/config.json`` holds a
  password for that host: ``datalad get`` sends nothing over plain http (a logging server on
  the machine's non-loopback address stands in for the registry) and fails with a clear
  message.  The same setting in the user's own git config works (positive control).
* Name links, image symlinks and stale run directories pointing at a victim directory: prune
  and a first run delete the links, never the victim.
* A first run SIGKILLed while udocker extracts leaves an unnamed container: it is listed and
  pruned.
* A relative or ``~`` udocker directory works for a first run.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fixtures import images as im
from fixtures.users import GITCONFIG
from fixtures.util import REPO_ROOT

PY = str(REPO_ROOT / ".venv" / "bin" / "python")
pytestmark = pytest.mark.timeout(600)


# --- pure parts (fast tier) ---------------------------------------------------------------
def test_remove_tree_follows_no_symlink(tmp_path):
    from datalad_udocker.errors import UdockerError
    from datalad_udocker.run.safe_delete import remove_tree
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "file").write_text("keep")
    victim.chmod(0o755)
    base = tmp_path / "base"
    tree = base / "tree" / "ro"
    tree.mkdir(parents=True)
    (tree / "escape").symlink_to(victim)
    (tree / "escape-file").symlink_to(victim / "file")
    (tree / "f").write_text("x")
    tree.chmod(0o555)                      # needs a chmod to empty: of the dir, not the links
    (base / "link").symlink_to(victim)
    remove_tree(base / "link", base)       # a symlink at the top: only the link
    remove_tree(base / "tree", base)
    assert sorted(p.name for p in base.iterdir()) == []
    assert (victim / "file").read_text() == "keep"
    assert (victim.stat().st_mode & 0o777, (victim / "file").stat().st_mode & 0o777) == \
        (0o755, 0o644)
    with pytest.raises(UdockerError, match="not inside"):
        remove_tree(victim, base)
    (base / "out").symlink_to(tmp_path)    # a path through a symlink out of ``inside``
    with pytest.raises(UdockerError, match="not inside"):
        remove_tree(base / "out" / "victim", base)
    assert (victim / "file").exists()


def test_settings_come_from_user_config_only(ds, monkeypatch):
    """Every datalad.udocker.* reader ignores .datalad/config, honours .git/config and env."""
    from datalad_udocker import config
    committed = {"insecure-registries": "evil.example:5000", "dir": "evil", "execmode": "R1",
                 "jobs": "64"}
    for name, value in committed.items():
        ds.config.set("datalad.udocker." + name, value, scope="branch")
    assert "evil.example:5000" in ds.config.get("datalad.udocker.insecure-registries")
    readers = lambda: (config.insecure_registries(ds), config.udocker_dir(ds),  # noqa: E731
                       config.execmode(ds), config.download_jobs(ds))
    monkeypatch.delenv("DATALAD_UDOCKER_DIR", raising=False)
    default_dir = os.path.join(os.environ["HOME"], ".cache", "datalad-udocker", "udocker")
    assert readers() == (set(), default_dir, "P1", 4)
    for name, value in (("insecure-registries", "mine:1, other"), ("dir", "~/ud"),
                        ("execmode", "f1"), ("jobs", "2")):
        ds.config.set("datalad.udocker." + name, value, scope="local")
    assert readers() == ({"mine:1", "other"}, os.path.expanduser("~/ud"), "F1", 2)
    monkeypatch.setenv("DATALAD_UDOCKER_EXECMODE", "P2")
    monkeypatch.setenv("DATALAD_UDOCKER_DIR", "rel")
    assert readers()[1:3] == (os.path.abspath("rel"), "P2")


# --- a hostile dataset's committed config (clone by a second user) --------------------------
def non_loopback_ip() -> str:
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, check=True).stdout
    for addr in out.split():
        if ":" not in addr and not addr.startswith("127."):
            return addr
    raise AssertionError(f"this machine has no non-loopback IPv4 address: {out!r}")


class LoggingRegistry:
    """Plain-http stand-in for a remote registry on the non-loopback address.

    Serves ``blobs`` (hex -> bytes) to requests carrying ``auth`` (Basic), answers 401 with a
    Basic challenge otherwise; records every connection and request with its headers.
    """

    def __init__(self, ip: str, blobs: dict, auth: str):
        self.blobs, self.auth = blobs, auth
        self.connections = 0
        self.requests: list = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def setup(self):
                owner.connections += 1
                super().setup()

            def log_message(self, *args):
                pass

            def do_GET(self):
                owner.requests.append((self.command, self.path, dict(self.headers)))
                hexpart = self.path.rpartition("sha256:")[2]
                if self.headers.get("Authorization") != owner.auth:
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="registry"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif hexpart in owner.blobs:
                    data = owner.blobs[hexpart]
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command == "GET":
                        self.wfile.write(data)
                else:
                    self.send_error(404)

            do_HEAD = do_GET

        self.server = ThreadingHTTPServer((ip, 0), Handler)
        self.host = f"{ip}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


class Victim:
    """The non-root user with a HOME of its own (git config, docker credentials)."""

    def __init__(self, nonroot):
        self.nonroot = nonroot
        self.base = nonroot.make_tempdir("udtest-trust-")
        self.home = self.base / "home"
        (self.home / ".docker").mkdir(parents=True)
        (self.home / ".gitconfig").write_text(GITCONFIG)
        self.env = {"HOME": str(self.home), "DATALAD_UDOCKER_DIR": str(self.base / "udocker")}
        subprocess.run(["chown", "-R", f"{nonroot.uid}:{nonroot.gid}", str(self.home)],
                       check=True)

    def run(self, cmd, cwd=None, check=True, env=None):
        """``cmd`` as the user; ``env`` adds variables (None: leave the variable unset)."""
        env = {k: v for k, v in {**self.env, **(env or {})}.items() if v is not None}
        return self.nonroot.run(cmd, cwd=cwd or self.base, env=env, check=check)

    def annex(self, ds, *args) -> str:
        return self.run(["git", "annex", *args], cwd=ds).stdout


@pytest.fixture
def victim(nonroot):
    v = Victim(nonroot)
    yield v
    shutil.rmtree(v.base, ignore_errors=True)


def hostile_dataset(victim, registry, remote_host):
    """A dataset whose layers are registered only at ``http://remote_host/...`` and that commits
    ``datalad.udocker.insecure-registries=remote_host``; returns (path, {hex: layer bytes})."""
    origin = victim.base / "origin"
    victim.run(["datalad", "create", "-c", "text2git", str(origin)])
    victim.run(["datalad", "udocker-import", "-d", str(origin), "-n", "single",
                f"{registry.host}/test/single:1"])
    blobs = {}
    image = origin / ".datalad" / "environments" / "single" / "image" / "blobs" / "sha256"
    for layer in (p for p in image.iterdir() if p.is_symlink()):
        key = os.path.basename(os.readlink(layer))
        blobs[layer.name] = layer.read_bytes()
        path = f"/v2/test/single/blobs/sha256:{layer.name}"
        victim.annex(origin, "registerurl", key, f"http://{remote_host}{path}")
        victim.annex(origin, "unregisterurl", key, f"http://{registry.host}{path}")
        victim.annex(origin, "drop", "--force", "--key", key)
    assert blobs
    victim.run(["git", "config", "-f", ".datalad/config",
                "datalad.udocker.insecure-registries", remote_host], cwd=origin)
    victim.run(["datalad", "save", "-m", "hostile", ".datalad/config"], cwd=origin)
    return origin, blobs


def test_committed_insecure_registries_are_ignored(victim, registry):
    ip = non_loopback_ip()
    with LoggingRegistry(ip, {}, "") as server:
        origin, blobs = hostile_dataset(victim, registry, server.host)
        server.blobs = blobs
        secret = base64.b64encode(b"victim:s3cret-pw").decode()
        server.auth = "Basic " + secret
        (victim.home / ".docker" / "config.json").write_text(
            json.dumps({"auths": {server.host: {"auth": secret}}}))
        victim.nonroot.chown(victim.home / ".docker" / "config.json")
        victim.run(["datalad", "clone", str(origin), "clone"])
        clone = victim.base / "clone"
        image = ".datalad/environments/single/image"

        res = victim.run(["datalad", "get", image], cwd=clone, check=False)
        assert res.returncode != 0, res.stdout
        assert server.connections == 0 and server.requests == [], server.requests
        assert "datalad.udocker.insecure-registries" in res.stdout + res.stderr, \
            (res.stdout, res.stderr)
        assert not any((clone / image / "blobs" / "sha256" / h).exists() for h in blobs)

        # positive control: the same setting in the user's own git config is honoured
        victim.run(["git", "config", "--global", "datalad.udocker.insecure-registries",
                    server.host])
        victim.run(["datalad", "get", image], cwd=clone)
        assert all((clone / image / "blobs" / "sha256" / h).read_bytes() == blobs[h]
                   for h in blobs)
        assert any(h.get("Authorization") == server.auth for _, _, h in server.requests)


def test_committed_udocker_dir_and_execmode_are_ignored(victim, registry):
    """A committed ``datalad.udocker.dir`` (into the dataset) and ``execmode`` have no effect."""
    origin = victim.base / "origin"
    victim.run(["datalad", "create", "-c", "text2git", str(origin)])
    victim.run(["datalad", "udocker-import", "-d", str(origin), "-n", "single",
                f"{registry.host}/test/single:1"])
    victim.run(["git", "config", "-f", ".datalad/config", "datalad.udocker.dir", "evil-udocker"],
               cwd=origin)
    victim.run(["git", "config", "-f", ".datalad/config", "datalad.udocker.execmode", "X9"],
               cwd=origin)
    victim.run(["datalad", "save", "-m", "hostile", ".datalad/config"], cwd=origin)
    victim.run(["datalad", "clone", str(origin), "clone"])
    clone = victim.base / "clone"
    env = {"DATALAD_UDOCKER_DIR": None}                # the default udocker dir (in ~/.cache)
    res = victim.run(["datalad", "containers-run", "-n", "single", "true"], cwd=clone,
                     env=env, check=False)
    assert res.returncode == 0, (res.stdout, res.stderr)
    assert not (clone / "evil-udocker").exists()
    assert (victim.home / ".cache" / "datalad-udocker" / "udocker" / "containers").is_dir()
    got = victim.run([PY, "-c", (
        "import json; from datalad.api import udocker_containers as u\n"
        "print(json.dumps([r['execmode'] for r in u(dataset='.', result_renderer='disabled')]))"
    )], cwd=clone, env=env)
    assert json.loads(got.stdout.splitlines()[-1]) == ["P1"]


# --- deletes follow no symlink; orphans of killed first runs ------------------------------
def manifest_hex(layout: Path) -> str:
    index = json.loads((layout / "index.json").read_text())
    return index["manifests"][0]["digest"].split(":")[1]


def cli(victim, *args, cwd=None, env=None):
    return victim.run([PY, "-m", "datalad_udocker.run.cli", *map(str, args)], cwd=cwd,
                      env=env, check=False)


def containers(victim):
    got = victim.run([PY, "-c", (
        "import json; from datalad.api import udocker_containers as u\n"
        "print(json.dumps([[r['name'], r['container_id'], r['path']] "
        "for r in u(result_renderer='disabled') if r['status'] == 'ok']))")])
    return json.loads(got.stdout.splitlines()[-1])


def prune(victim):
    res = victim.run(["datalad", "udocker-containers", "--prune"], check=False)
    assert res.returncode == 0, (res.stdout, res.stderr)


def test_prune_and_first_run_follow_no_symlink(victim):
    udir = victim.base / "udocker"
    target = victim.base / "victim"
    (target / "sub").mkdir(parents=True)
    (target / "sub" / "file").write_text("precious")
    victim.nonroot.chown(target)
    victim.nonroot.chown(target / "sub")
    victim.nonroot.chown(target / "sub" / "file")

    def intact():
        return ((target / "sub" / "file").read_text() == "precious"
                and (target / "sub").stat().st_mode & 0o777 == 0o755)

    # an image whose tree holds symlinks to the victim inside a read-only directory
    layout = victim.base / "img"
    im.build_image(layout, "img", [im.make_layer({
        **im.busybox_rootfs(), "ro": im.Dir(0o555), "ro/escape": im.Symlink(str(target)),
        "ro/escape-file": im.Symlink(str(target / "sub" / "file"))})], cmd=["/bin/sh"])
    subprocess.run(["chmod", "-R", "a+rX", str(layout)], check=True)
    name = f"dlu-{manifest_hex(layout)}-p1"
    cdir = udir / "containers"

    def plant():
        cdir.mkdir(parents=True, exist_ok=True)
        for link in (name, "dlu-stray"):
            (cdir / link).symlink_to(target)
        run_dir = udir / "datalad-udocker" / "run"
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "tmpstale").symlink_to(target)
        os.utime(run_dir / "tmpstale", (0, 0), follow_symlinks=False)
        subprocess.run(["chown", "-R", "-h", f"{victim.nonroot.uid}", str(udir)], check=True)

    plant()
    assert sorted(c[0] for c in containers(victim)) == sorted(["dlu-stray", name])
    prune(victim)
    assert intact() and sorted(os.listdir(cdir)) == []
    assert not os.path.lexists(udir / "datalad-udocker" / "run" / "tmpstale")

    plant()                                    # a first run discards the planted name link
    res = cli(victim, layout, "true")
    assert res.returncode == 0, res.stderr
    assert intact()
    prune(victim)                              # the image's own symlinks, in a read-only dir
    assert intact() and sorted(os.listdir(cdir)) == []


def test_first_run_killed_during_extraction_leaves_nothing_behind(victim):
    """SIGKILL of a first run (its whole process group, as scancel or a closed terminal does)
    while udocker extracts: the unnamed container is listed as incomplete and pruned."""
    udir = victim.base / "udocker"
    layout = victim.base / "img"
    many = {f"many/{i // 1000}/f{i}": b"" for i in range(30000)}     # slow to extract
    im.build_image(layout, "img", [im.make_layer(im.busybox_rootfs()), im.make_layer(many)],
                   cmd=["/bin/sh"])
    subprocess.run(["chmod", "-R", "a+rX", str(layout)], check=True)
    cdir = udir / "containers"
    proc = subprocess.Popen(
        victim.nonroot.command([PY, "-m", "datalad_udocker.run.cli", str(layout), "true"]),
        env=victim.nonroot.env(victim.env), cwd=str(victim.base), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not (cdir.is_dir() and any((p / "ROOT" / "many").is_dir() for p in cdir.iterdir()
                                         if not p.is_symlink())):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "no container directory appeared"
            time.sleep(0.01)                   # polling for a state, not waiting for time
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert [p.name for p in cdir.iterdir() if p.is_symlink()] == [], \
        "the kill landed after extraction: make the layer slower to extract"
    orphan = [p for p in cdir.iterdir()]
    assert len(orphan) == 1

    listed = containers(victim)
    assert listed == [[orphan[0].name, "", str(orphan[0])]]
    prune(victim)
    assert list(cdir.iterdir()) == [] and containers(victim) == []
    res = cli(victim, layout, "true")            # and the next first run just works
    assert res.returncode == 0, res.stderr


def test_relative_and_home_udocker_dir(victim):
    layout = victim.base / "img"
    im.build_image(layout, "img", [im.make_layer(im.busybox_rootfs())], cmd=["/bin/sh"])
    subprocess.run(["chmod", "-R", "a+rX", str(layout)], check=True)
    work = victim.nonroot.make_tempdir("udtest-cwd-")
    try:
        res = cli(victim, layout, "true", cwd=work, env={"DATALAD_UDOCKER_DIR": "rel/ud"})
        assert res.returncode == 0, res.stderr
        assert any((work / "rel" / "ud" / "containers").iterdir())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    victim.run(["git", "config", "--global", "datalad.udocker.dir", "~/tilde-ud"])
    res = cli(victim, layout, "true", env={"DATALAD_UDOCKER_DIR": None})
    assert res.returncode == 0, res.stderr
    assert any((victim.home / "tilde-ud" / "containers").iterdir())
    assert not (victim.base / "~").exists()
