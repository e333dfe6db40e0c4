"""Digests, git-annex keys, and a writer that verifies as bytes pass.

A registry blob ``sha256:<hex>`` of ``<size>`` bytes is the git-annex key
``SHA256-s<size>--<hex>``: known from the manifest before a byte is fetched.
"""
import hashlib
import re

from .errors import DigestMismatch, UdockerError

_KEY_RE = re.compile(r"^SHA256-s(\d+)--([0-9a-f]{64})$")
CHUNK = 1 << 20


def sha256_digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def annex_key(digest, size):
    """git-annex SHA256 key for a registry blob."""
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or not re.match(r"^[0-9a-f]{64}$", hexpart):
        raise UdockerError("unsupported digest %s (only sha256 blobs can be "
                           "stored in git-annex)" % digest)
    return "SHA256-s%d--%s" % (int(size), hexpart)


def digest_from_key(key):
    """(digest, size) of a key made by :func:`annex_key`, else ValueError."""
    m = _KEY_RE.match(key)
    if not m:
        raise ValueError("not a SHA256 blob key: %s" % key)
    return "sha256:" + m.group(2), int(m.group(1))


def file_digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


class VerifyingWriter:
    """Append bytes to a file while hashing and counting them.

    Opened on an existing partial file it first hashes what is there, so a
    download can resume.  :meth:`verify` raises DigestMismatch unless exactly
    ``size`` bytes with ``digest`` were written; nothing is ever renamed into
    place before that.
    """

    def __init__(self, path, digest, size):
        self.path, self.digest, self.size = path, digest, size
        self._hash = hashlib.sha256()
        self.written = 0
        try:
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(CHUNK), b""):
                    self._hash.update(chunk)
                    self.written += len(chunk)
        except FileNotFoundError:
            pass
        if self.written > size:
            self.written = 0
            self._hash = hashlib.sha256()
            open(path, "wb").close()
        self._file = open(path, "ab")

    def write(self, data):
        if self.written + len(data) > self.size:
            raise DigestMismatch(
                "blob %s is larger than the %d bytes its manifest declares"
                % (self.digest, self.size))
        self._file.write(data)
        self._hash.update(data)
        self.written += len(data)

    def close(self):
        self._file.close()

    def verify(self):
        self._file.flush()
        got = "sha256:" + self._hash.hexdigest()
        if self.written != self.size or got != self.digest:
            raise DigestMismatch(
                "blob %s failed verification (%d of %d bytes, digest %s); "
                "the registry or a proxy served wrong bytes: retry later"
                % (self.digest, self.written, self.size, got))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
