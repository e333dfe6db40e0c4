"""Registry credentials, found where ``docker login`` and podman put them.

:func:`lookup` searches, in order:

1. Docker's ``$DOCKER_CONFIG/config.json`` (default ``~/.docker/config.json``):
   ``credHelpers[host]`` or ``credsStore`` (runs ``docker-credential-<helper>
   get`` with the server URL on stdin), then ``auths`` entries (base64
   ``auth``, ``username``/``password``, ``identitytoken``);
2. containers' auth files (podman, skopeo, buildah): ``$REGISTRY_AUTH_FILE``,
   ``$XDG_RUNTIME_DIR/containers/auth.json``,
   ``~/.config/containers/auth.json`` (same format as Docker's file).

Keys may carry a scheme and a path (``https://host/v1/``); they are compared
by host[:port] only.  Docker Hub's historic key is
``https://index.docker.io/v1/``; ``docker.io``, ``index.docker.io`` and
``registry-1.docker.io`` all name Docker Hub.  Missing or corrupt files and
failing helpers are skipped with a debug log; secrets are never logged.
"""
import base64
import binascii
import json
import logging
import os
import subprocess
from dataclasses import dataclass, field
from typing import Iterator, List, Optional

lgr = logging.getLogger("datalad.udocker.registry.credentials")

DOCKER_HUB_KEY = "https://index.docker.io/v1/"
DOCKER_HUB_ALIASES = frozenset(
    ("docker.io", "index.docker.io", "registry-1.docker.io"))
# a credential helper's username meaning "the secret is an identity token"
TOKEN_USERNAME = "<token>"
HELPER_TIMEOUT = 30


@dataclass(frozen=True)
class Credentials:
    """A username and a secret (password, or identity token) for one registry.

    ``identity_token`` is set when the secret is an OAuth2 refresh token
    (``identitytoken`` in config.json); it is then sent as the password.
    """

    username: str
    password: str = field(repr=False)
    identity_token: bool = False

    def __repr__(self):
        return "Credentials(username=%r, password=<hidden>)" % self.username


def normalize_host(key):
    """host[:port] of a config key or registry name; Docker Hub -> docker.io.

    ``https://index.docker.io/v1/`` -> ``docker.io``;
    ``http://127.0.0.1:5000/v2/`` -> ``127.0.0.1:5000``.
    """
    host = key.strip()
    if "://" in host:
        host = host.split("://", 1)[1]
    host = host.split("/", 1)[0].lower()
    if host.endswith(":443") and not host.startswith("["):
        # https default port: ``host:443`` and ``host`` are the same server
        host = host[:-4]
    return "docker.io" if host in DOCKER_HUB_ALIASES else host


def docker_config_path():
    """Path of Docker's config.json ($DOCKER_CONFIG or ~/.docker)."""
    base = os.environ.get("DOCKER_CONFIG") or os.path.join(
        os.path.expanduser("~"), ".docker")
    return os.path.join(base, "config.json")


def containers_auth_paths():
    """Containers' auth.json candidates, most specific first."""
    paths = []
    if os.environ.get("REGISTRY_AUTH_FILE"):
        paths.append(os.environ["REGISTRY_AUTH_FILE"])
    if os.environ.get("XDG_RUNTIME_DIR"):
        paths.append(os.path.join(os.environ["XDG_RUNTIME_DIR"],
                                  "containers", "auth.json"))
    paths.append(os.path.join(os.path.expanduser("~"), ".config",
                              "containers", "auth.json"))
    return paths


def config_files() -> List[str]:
    """Every file :func:`lookup` reads, in order, without duplicates."""
    out = []
    for path in [docker_config_path()] + containers_auth_paths():
        if path not in out:
            out.append(path)
    return out


def lookup(registry_host) -> Optional[Credentials]:
    """Credentials for ``registry_host`` (host[:port]), or None.

    Never raises for unreadable files or failing helpers.
    """
    wanted = normalize_host(registry_host)
    for path in config_files():
        config = _read_json(path)
        if config is None:
            continue
        creds = _from_config(config, wanted, path)
        if creds is not None:
            lgr.debug("using credentials for %s from %s (user %s)",
                      wanted, path, creds.username)
            return creds
    lgr.debug("no credentials for %s", wanted)
    return None


def _read_json(path):
    try:
        with open(path, "rb") as f:
            doc = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        lgr.debug("ignoring unreadable credentials file %s: %s",
                  path, type(exc).__name__)
        return None
    if not isinstance(doc, dict):
        lgr.debug("ignoring credentials file %s: not a JSON object", path)
        return None
    return doc


def _matching_keys(mapping, wanted) -> Iterator[str]:
    """Keys of ``mapping`` that name host ``wanted`` (exact key first)."""
    if not isinstance(mapping, dict):
        return
    keys = sorted(mapping, key=lambda k: k != wanted)
    for key in keys:
        if isinstance(key, str) and normalize_host(key) == wanted:
            yield key


def _server_url(wanted, keys):
    """What to pass to a credential helper: the configured key if any."""
    for key in keys:
        return key
    return DOCKER_HUB_KEY if wanted == "docker.io" else wanted


def _from_config(config, wanted, path):
    auths = config.get("auths")
    auth_keys = list(_matching_keys(auths, wanted))
    helpers = config.get("credHelpers")
    helper = None
    for key in _matching_keys(helpers, wanted):
        helper = helpers[key]
        break
    if not helper and isinstance(config.get("credsStore"), str):
        helper = config["credsStore"]
    if helper:
        creds = _from_helper(helper, _server_url(wanted, auth_keys))
        if creds is not None:
            return creds
    for key in auth_keys:
        creds = _from_auth_entry(auths[key], key, path)
        if creds is not None:
            return creds
    return None


def _from_auth_entry(entry, key, path):
    if not isinstance(entry, dict):
        return None
    username, password = entry.get("username"), entry.get("password")
    if entry.get("auth"):
        try:
            decoded = base64.b64decode(entry["auth"], validate=False).decode(
                "utf-8")
        except (binascii.Error, ValueError, TypeError):
            lgr.debug("ignoring undecodable 'auth' for %s in %s", key, path)
            decoded = ""
        if ":" in decoded:
            username, password = decoded.split(":", 1)
    if entry.get("identitytoken"):
        return Credentials(username or TOKEN_USERNAME,
                           str(entry["identitytoken"]), identity_token=True)
    if username and password is not None and isinstance(username, str):
        return Credentials(username, str(password))
    return None


def _from_helper(helper, server_url):
    """Run ``docker-credential-<helper> get``; None if it has nothing."""
    program = "docker-credential-%s" % helper
    try:
        proc = subprocess.run([program, "get"], input=server_url.encode(),
                              capture_output=True, timeout=HELPER_TIMEOUT)
    except (OSError, subprocess.SubprocessError) as exc:
        lgr.debug("credential helper %s unusable: %s", program,
                  type(exc).__name__)
        return None
    if proc.returncode != 0:
        # "credentials not found in native keychain" and the like
        lgr.debug("credential helper %s has no credentials for %s (exit %d)",
                  program, server_url, proc.returncode)
        return None
    try:
        doc = json.loads(proc.stdout)
        username, secret = doc["Username"], doc["Secret"]
    except (ValueError, KeyError, TypeError):
        lgr.debug("credential helper %s answered malformed JSON", program)
        return None
    if not secret:
        return None
    if username == TOKEN_USERNAME:
        return Credentials(username, secret, identity_token=True)
    return Credentials(username, secret)
