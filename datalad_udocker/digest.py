"""Digests, git-annex keys, and the one place bytes are hashed.

A registry blob ``sha256:<hex>`` of ``<size>`` bytes is the git-annex key
``SHA256-s<size>--<hex>``: known from the manifest before a byte is fetched.

A digest read from JSON becomes a :class:`Digest` (checked once, when it is
parsed); every site that hashes bytes does it through :class:`Hasher`,
:class:`HashingReader` or :class:`VerifyingWriter` here.
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


class Digest(str):
    """A checked ``sha256:<64 hex>`` digest; a ``str`` everywhere else.

    ``Digest(value)`` raises InvalidDigest for anything else (see
    :func:`check_digest`); a Digest given again is returned as it is.
    """
    __slots__ = ()

    def __new__(cls, value, what="digest"):
        if type(value) is cls:
            return value
        return super().__new__(cls, _checked(value, what))

    @property
    def algorithm(self):
        return self[:self.index(":")]

    @property
    def hex(self):
        return self[self.index(":") + 1:]


def hex_part(digest):
    """The part after ``algorithm:`` of a digest-like string not (yet)
    checked, e.g. a name read back from our own state files."""
    return digest.partition(":")[2]


class Hasher:
    """sha256 of the bytes given to :meth:`update`, and their count."""

    def __init__(self):
        self._hash, self.count = hashlib.sha256(), 0

    def update(self, data):
        self._hash.update(data)
        self.count += len(data)

    @property
    def digest(self):
        return Digest("sha256:" + self._hash.hexdigest())


def check_hashed(hasher, digest, size):
    """Raise DigestMismatch unless ``hasher`` (a Hasher) saw exactly ``size``
    bytes with ``digest``: the one verdict on a downloaded blob."""
    got = hasher.digest
    if hasher.count != size or got != digest:
        raise DigestMismatch(
            "blob %s failed verification (%d of %d bytes, digest %s); "
            "the registry or a proxy served wrong bytes: retry later"
            % (digest, hasher.count, size, got))


def sha256_digest(data):
    hasher = Hasher()
    hasher.update(data)
    return hasher.digest


def _shown(value):
    """``value`` fit for a one-line message: repr, shortened."""
    try:
        text = repr(value)
    except ValueError:           # an int too long to print
        return "<a %d-bit number>" % value.bit_length()
    return text if len(text) <= 90 else text[:80] + "..." + text[-6:]


def check_digest(value, what="digest"):
    """``value`` as a :class:`Digest` if it is ``sha256:`` and 64 lowercase
    hex digits.

    Anything else (another type, another algorithm, path or URL characters)
    raises InvalidDigest: a digest read from JSON goes into URLs, file names
    and git-annex keys only after this check.
    """
    return Digest(value, what)


def _checked(value, what):
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
    return "SHA256-s%d--%s" % (check_size(size), Digest(digest).hex)


def digest_from_key(key):
    """(digest, size) of a key made by :func:`annex_key`, else ValueError."""
    m = _KEY_RE.match(key)
    if not m:
        raise ValueError("not a SHA256 blob key: %s" % key)
    return Digest("sha256:" + m.group(2)), int(m.group(1))


def file_digest(path):
    with open(path, "rb") as f:
        reader = HashingReader(f)
        reader.drain()
    return reader.digest


class HashingReader:
    """A binary file object read through :meth:`read`, hashed as it goes.

    :attr:`digest` and :attr:`count` are those of the bytes read so far;
    :meth:`drain` reads the rest (what a consumer such as a tar reader left).
    """

    def __init__(self, f):
        self._f, self._hasher = f, Hasher()

    def read(self, size=-1):
        data = self._f.read(size)
        self._hasher.update(data)
        return data

    def drain(self):
        for _ in iter(lambda: self.read(CHUNK), b""):
            pass

    @property
    def count(self):
        return self._hasher.count

    @property
    def digest(self):
        return self._hasher.digest


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
        self._hash = Hasher()
        if path is None:
            self._file = io.BytesIO()
            return
        try:
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(CHUNK), b""):
                    self._hash.update(chunk)
        except FileNotFoundError:
            pass
        if self.written > size:
            self._hash = Hasher()
            open(path, "wb").close()
        self._file = open(path, "ab")

    @property
    def written(self):
        return self._hash.count

    def write(self, data):
        if self.written + len(data) > self.size:
            raise DigestMismatch(
                "blob %s is larger than the %d bytes its manifest declares"
                % (self.digest, self.size))
        self._file.write(data)
        self._hash.update(data)

    def reset(self):
        """Forget everything written: start again from byte 0."""
        self._file.seek(0)
        self._file.truncate()
        self._hash = Hasher()

    def getvalue(self):
        """The bytes written (in-memory writers only)."""
        return self._file.getvalue()

    def close(self):
        if self.path is not None:
            self._file.close()

    def verify(self):
        self._file.flush()
        check_hashed(self._hash, self.digest, self.size)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
