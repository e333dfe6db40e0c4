"""Digests, git-annex keys, and a writer that verifies as bytes pass.

A registry blob ``sha256:<hex>`` of ``<size>`` bytes is the git-annex key
``SHA256-s<size>--<hex>``: known from the manifest before a byte is fetched.
"""
import hashlib
import io
import re

from .errors import DigestMismatch, InvalidDigest

_KEY_RE = re.compile(r"^SHA256-s(\d+)--([0-9a-f]{64})$")
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}\Z")
_ALGORITHM_RE = re.compile(r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+\Z")
CHUNK = 1 << 20
MAX_BLOB_SIZE = 1 << 40          # 1 TiB: no real layer comes near it


def sha256_digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _shown(value):
    """``value`` fit for a one-line message: repr, shortened."""
    try:
        text = repr(value)
    except ValueError:           # an int too long to print
        return "<a %d-bit number>" % value.bit_length()
    return text if len(text) <= 90 else text[:80] + "..." + text[-6:]


def check_digest(value, what="digest"):
    """``value`` if it is ``sha256:`` and 64 lowercase hex digits.

    Anything else (another type, another algorithm, path or URL characters)
    raises InvalidDigest: a digest read from JSON goes into URLs, file names
    and git-annex keys only after this check.
    """
    if isinstance(value, str) and DIGEST_RE.match(value):
        return value
    if isinstance(value, str) and _ALGORITHM_RE.match(value):
        algo = value.split(":", 1)[0]
        if algo != "sha256":
            raise InvalidDigest(
                "%s %s uses digest algorithm %s: only sha256 is supported"
                % (what, _shown(value), _shown(algo)))
    raise InvalidDigest("%s %s is not a valid digest (expected sha256: and "
                        "64 lowercase hex digits)" % (what, _shown(value)))


def check_size(value, what="size"):
    """``value`` if it is an int (not a bool) in [0, MAX_BLOB_SIZE]."""
    if (isinstance(value, int) and not isinstance(value, bool)
            and 0 <= value <= MAX_BLOB_SIZE):
        return int(value)
    raise InvalidDigest("%s %s is not a valid size (expected an integer "
                        "from 0 to %d)" % (what, _shown(value), MAX_BLOB_SIZE))


def annex_key(digest, size):
    """git-annex SHA256 key for a registry blob."""
    hexpart = check_digest(digest).split(":", 1)[1]
    return "SHA256-s%d--%s" % (check_size(size), hexpart)


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
    place before that.  With ``path`` None the bytes are kept in memory
    (:meth:`getvalue`), for small blobs such as an image config.
    """

    def __init__(self, path, digest, size):
        self.path, self.digest, self.size = path, digest, size
        self._hash = hashlib.sha256()
        self.written = 0
        if path is None:
            self._file = io.BytesIO()
            return
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

    def reset(self):
        """Forget everything written: start again from byte 0."""
        self._file.seek(0)
        self._file.truncate()
        self._hash = hashlib.sha256()
        self.written = 0

    def getvalue(self):
        """The bytes written (in-memory writers only)."""
        return self._file.getvalue()

    def close(self):
        if self.path is not None:
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
