"""registry.credentials: real config files and a real credential-helper program."""
import base64
import json
import logging
import os
import stat

import pytest

from datalad_udocker.registry import credentials as cr
from datalad_udocker.registry.credentials import Credentials, lookup, normalize_host


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty HOME with no Docker/containers config, isolated from the user's."""
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("HOME", str(h))
    for var in ("DOCKER_CONFIG", "REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(var, raising=False)
    return h


def b64(text):
    return base64.b64encode(text.encode()).decode()


def write_json(path, doc):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    return path


@pytest.fixture
def helper(tmp_path, monkeypatch):
    """Install ``docker-credential-testhelper`` on PATH; it answers from a JSON map
    keyed by the server URL it reads on stdin and logs what it was asked."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    store = tmp_path / "helper-store.json"
    asked = tmp_path / "helper-asked.log"
    script = bindir / "docker-credential-testhelper"
    script.write_text(f"""#!/usr/bin/env python3
import json, sys
assert sys.argv[1:] == ["get"], sys.argv
url = sys.stdin.read().strip()
open({str(asked)!r}, "a").write(url + "\\n")
store = json.load(open({str(store)!r}))
if url not in store:
    print("credentials not found in native keychain")
    sys.exit(1)
print(json.dumps(store[url]))
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    store.write_text("{}")

    class Helper:
        def set(self, mapping):
            store.write_text(json.dumps(mapping))

        def asked(self):
            return asked.read_text().split() if asked.exists() else []
    return Helper()


@pytest.mark.parametrize("key, host", [
    ("https://index.docker.io/v1/", "docker.io"),
    ("index.docker.io", "docker.io"),
    ("registry-1.docker.io", "docker.io"),
    ("docker.io", "docker.io"),
    ("http://127.0.0.1:5000/v2/", "127.0.0.1:5000"),
    ("https://Quay.IO", "quay.io"),
    ("quay.io:443", "quay.io"),
    ("ghcr.io/some/path", "ghcr.io"),
])
def test_normalize_host(key, host):
    assert normalize_host(key) == host


def test_repr_hides_password():
    c = Credentials("alice", "s3cr3t")
    assert "s3cr3t" not in repr(c) and "s3cr3t" not in str(c)
    assert "alice" in repr(c)


def test_nothing_configured(home):
    assert lookup("127.0.0.1:5000") is None


def test_docker_config_auth_field(home):
    write_json(home / ".docker" / "config.json",
               {"auths": {"127.0.0.1:5000": {"auth": b64("bob:pa:ss")}}})
    c = lookup("127.0.0.1:5000")
    assert (c.username, c.password, c.identity_token) == ("bob", "pa:ss", False)
    assert lookup("127.0.0.1:5001") is None


def test_docker_config_env_and_username_password(home, tmp_path, monkeypatch):
    cfgdir = tmp_path / "dockercfg"
    write_json(cfgdir / "config.json", {"auths": {
        "https://registry.example.org/v1/": {"username": "u", "password": "p"}}})
    # the default location holds something else: $DOCKER_CONFIG wins
    write_json(home / ".docker" / "config.json",
               {"auths": {"registry.example.org": {"auth": b64("other:x")}}})
    monkeypatch.setenv("DOCKER_CONFIG", str(cfgdir))
    c = lookup("registry.example.org")
    assert (c.username, c.password) == ("u", "p")


@pytest.mark.parametrize("wanted", ["docker.io", "index.docker.io",
                                    "registry-1.docker.io"])
def test_docker_hub_key(home, wanted):
    write_json(home / ".docker" / "config.json",
               {"auths": {"https://index.docker.io/v1/": {"auth": b64("hub:pw")}}})
    assert lookup(wanted).username == "hub"


def test_identity_token(home):
    write_json(home / ".docker" / "config.json", {"auths": {
        "myreg.example": {"auth": b64("<token>:"), "identitytoken": "refresh-123"}}})
    c = lookup("myreg.example")
    assert c.identity_token and c.password == "refresh-123"


def test_containers_auth_files_in_order(home, tmp_path, monkeypatch):
    user_file = write_json(home / ".config" / "containers" / "auth.json",
                           {"auths": {"reg.example": {"auth": b64("user-file:1")}}})
    run_dir = tmp_path / "run"
    write_json(run_dir / "containers" / "auth.json",
               {"auths": {"reg.example": {"auth": b64("runtime-file:2")}}})
    assert lookup("reg.example").username == "user-file"
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run_dir))
    assert lookup("reg.example").username == "runtime-file"
    explicit = write_json(tmp_path / "explicit.json",
                          {"auths": {"reg.example": {"auth": b64("explicit:3")}}})
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(explicit))
    assert lookup("reg.example").username == "explicit"
    # Docker's file comes first of all
    write_json(home / ".docker" / "config.json",
               {"auths": {"reg.example": {"auth": b64("docker:4")}}})
    assert lookup("reg.example").username == "docker"
    assert user_file.exists()


def test_corrupt_files_are_ignored(home, tmp_path, monkeypatch, caplog):
    write_json(home / ".docker" / "config.json", "{not json")
    write_json(tmp_path / "list.json", "[1, 2]")
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "list.json"))
    write_json(home / ".config" / "containers" / "auth.json", {"auths": {
        "bad.example": {"auth": "!!!not-base64"},
        "weird.example": "a string, not an object",
        "good.example": {"auth": b64("good:pw")}}})
    with caplog.at_level(logging.DEBUG, logger="datalad.udocker"):
        assert lookup("bad.example") is None
        assert lookup("weird.example") is None
        assert lookup("good.example").username == "good"
    assert "config.json" in caplog.text


def test_unreadable_directory_is_ignored(home, monkeypatch):
    # config.json is a directory: open() fails with IsADirectoryError
    (home / ".docker" / "config.json").mkdir(parents=True)
    assert lookup("reg.example") is None


def test_cred_helper_for_host(home, helper):
    helper.set({"reg.example": {"ServerURL": "reg.example", "Username": "helped",
                                "Secret": "from-helper"}})
    write_json(home / ".docker" / "config.json", {
        "auths": {"reg.example": {"auth": b64("inline:pw")}},
        "credHelpers": {"reg.example": "testhelper"}})
    c = lookup("reg.example")
    assert (c.username, c.password) == ("helped", "from-helper")
    assert helper.asked() == ["reg.example"]


def test_creds_store_docker_hub_url(home, helper):
    helper.set({"https://index.docker.io/v1/": {"Username": "hubuser", "Secret": "hubpw"}})
    write_json(home / ".docker" / "config.json",
               {"auths": {"https://index.docker.io/v1/": {}}, "credsStore": "testhelper"})
    assert lookup("docker.io").username == "hubuser"
    assert helper.asked() == ["https://index.docker.io/v1/"]


def test_helper_token_username(home, helper):
    helper.set({"reg.example": {"Username": "<token>", "Secret": "idtok"}})
    write_json(home / ".docker" / "config.json", {"credsStore": "testhelper"})
    c = lookup("reg.example")
    assert c.identity_token and c.password == "idtok"


def test_helper_without_entry_falls_back(home, helper):
    write_json(home / ".docker" / "config.json", {
        "auths": {"reg.example": {"auth": b64("inline:pw")}},
        "credsStore": "testhelper"})
    assert lookup("reg.example").username == "inline"
    assert lookup("other.example") is None


def test_missing_helper_program(home, caplog):
    write_json(home / ".docker" / "config.json",
               {"credHelpers": {"reg.example": "does-not-exist-anywhere"}})
    with caplog.at_level(logging.DEBUG, logger="datalad.udocker"):
        assert lookup("reg.example") is None
    assert "docker-credential-does-not-exist-anywhere" in caplog.text


def test_secrets_never_logged(home, helper, caplog):
    helper.set({"reg.example": {"Username": "helped", "Secret": "helper-secret-xyz"}})
    write_json(home / ".docker" / "config.json", {
        "auths": {"other.example": {"auth": b64("u:inline-secret-xyz")}},
        "credHelpers": {"reg.example": "testhelper"}})
    with caplog.at_level(logging.DEBUG, logger="datalad.udocker"):
        assert lookup("reg.example").password == "helper-secret-xyz"
        assert lookup("other.example").password == "inline-secret-xyz"
    assert "secret-xyz" not in caplog.text
    assert "secret-xyz" not in repr(cr.lookup("reg.example"))
