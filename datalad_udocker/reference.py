"""Image references, parsed as Docker parses them.

``busybox``                  -> docker.io / library/busybox : latest
``quay.io/org/img:1.0``      -> quay.io / org/img : 1.0
``localhost:5000/x@sha256:`` -> localhost:5000 / x @ digest
``repo:tag@sha256:...``      -> the digest wins; the tag is kept as a label
"""
import ipaddress
import re
from dataclasses import dataclass
from typing import Optional

from .errors import InvalidReference

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY_RE = re.compile(r"^%s(?:/%s)*$" % (_COMPONENT, _COMPONENT))
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST_RE = re.compile(r"^sha256:[a-f0-9]{64}\Z")
# what may follow the "@" of a digest: an algorithm and an encoded value (a
# "host:port" after an "@", digits too few for any hash, is userinfo)
_DIGEST_LIKE_RE = re.compile(
    r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:(?![0-9]{0,15}\Z)[a-zA-Z0-9=_-]*\Z")
_HINT = ("expected [REGISTRY/]REPOSITORY[:TAG][@sha256:DIGEST], "
         "e.g. docker.io/library/busybox:1.36")
_HOST_RE = re.compile(
    r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
    r"(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*|\[[0-9a-fA-F:.]+\])"
    r"(?::[0-9]+)?$")


@dataclass(frozen=True)
class Reference:
    """A parsed image reference: where an image lives and which one."""

    registry: str          # as written by the user, e.g. docker.io, 127.0.0.1:5000
    repository: str        # e.g. library/busybox
    tag: Optional[str] = None
    digest: Optional[str] = None

    @property
    def api_host(self):
        """Host[:port] the distribution API is served from."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def reference(self):
        """What goes after ``/manifests/``: the digest if known, else the tag."""
        return self.digest or self.tag or "latest"

    @property
    def name(self):
        """Last repository component: the default container name."""
        return self.repository.rsplit("/", 1)[-1]

    def with_digest(self, digest):
        return Reference(self.registry, self.repository, self.tag, digest)

    def is_loopback(self):
        return is_loopback_host(self.registry)

    def __str__(self):
        out = "%s/%s" % (self.registry, self.repository)
        if self.tag:
            out += ":" + self.tag
        if self.digest:
            out += "@" + self.digest
        return out


def is_loopback_host(host):
    """True for localhost, 127.0.0.0/8 and ::1, with or without a port."""
    if host.startswith("["):
        name = host[1:host.index("]")]
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _userinfo_end(text):
    """Index of the "@" ending a ``user[:password]@`` part of ``text``, or -1.

    A reference has at most one "@", and it introduces a digest at the very
    end; any other "@" ends userinfo (credentials typed into the reference).
    """
    at = text.rfind("@")
    if at < 0:
        return -1
    if _DIGEST_LIKE_RE.match(text, at + 1) and "@" not in text[:at]:
        return -1
    if _DIGEST_LIKE_RE.match(text, at + 1):
        return text.rfind("@", 0, at)
    return at


def redact_reference(text):
    """``text`` with any ``user:password@`` part hidden, safe to show."""
    if not isinstance(text, str):
        return "<not a string>"
    end = _userinfo_end(text)
    if end < 0:
        return text
    scheme, sep, _ = text.partition("://")
    prefix = scheme + sep if sep and len(scheme) < end else ""
    return prefix + "<credentials>@" + text[end + 1:]


def parse_reference(text):
    """Parse ``text`` into a :class:`Reference` or raise InvalidReference.

    A reference holding credentials (``user:password@host/...``) is refused
    with a message that does not contain them: credentials belong in
    ``docker login``'s ~/.docker/config.json, not in a reference that ends
    up in results, logs and the dataset.
    """
    if not isinstance(text, str):
        raise InvalidReference("invalid image reference (not a string): %s"
                               % _HINT)
    if _userinfo_end(text) >= 0:
        raise InvalidReference(
            "image reference %r contains credentials (user:password@); "
            "remove them and log in with `docker login REGISTRY` instead "
            "(credentials are read from ~/.docker/config.json)"
            % redact_reference(text))
    original = text
    hint = _HINT
    if "://" in text:
        # not echoed: what precedes an "@" after a scheme may be credentials
        raise InvalidReference(
            "invalid image reference: a URL (SCHEME://...) is not a reference; "
            "%s" % hint)
    if not text or text != text.strip():
        raise InvalidReference("invalid image reference %r: %s" % (original, hint))
    digest = None
    if "@" in text:
        text, digest = text.split("@", 1)
        if not _DIGEST_RE.match(digest):
            algo = digest.split(":", 1)[0]
            raise InvalidReference(
                "invalid digest %r in image reference: %s" % (digest, (
                    "only sha256: digests are supported" if algo != "sha256"
                    else "expected sha256: and 64 lowercase hex digits")))
    registry = DOCKER_HUB
    first, sep, rest = text.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"
                or first.startswith("[")):
        if not _HOST_RE.match(first):
            raise InvalidReference("invalid registry host in %r: %s"
                                   % (original, hint))
        registry, text = first, rest
    tag = None
    name, sep, maybe_tag = text.rpartition(":")
    if sep:
        if not _TAG_RE.match(maybe_tag):
            raise InvalidReference("invalid tag in %r: %s" % (original, hint))
        text, tag = name, maybe_tag
    if registry in (DOCKER_HUB, "index.docker.io", DOCKER_HUB_API):
        registry = DOCKER_HUB
        if "/" not in text:
            text = "library/" + text
    if not _REPOSITORY_RE.match(text):
        raise InvalidReference(
            "invalid repository name in %r (lowercase letters, digits and "
            "separators only): %s" % (original, hint))
    if tag is None and digest is None:
        tag = "latest"
    return Reference(registry, text, tag, digest)
