"""Refuse image layers that would write outside the container when they are extracted.

The layers are extracted by :mod:`.extract`, which applies each layer as ``udocker create``
did, following the plan :meth:`StackChecker.check_layer` returns; the model below is of
that behaviour.  ``udocker create`` extracts the layers of an image one after the other into the container's
``ROOT`` with GNU tar (``tar -x --no-same-owner --no-same-permissions --overwrite
--exclude=dev/* --exclude=etc/udev/devices/* --exclude=.wh.*``), and before each layer applies
its whiteouts itself: for every member listed by ``tar t --wildcards '*/.wh.*'`` it deletes
``ROOT/<dir>/<name>`` (``.wh.<name>``) or everything in ``ROOT/<dir>`` (``.wh..wh..opq``).
GNU tar refuses ``..`` in member names and replaces an existing symlink at a member's own
path, but it follows symlinks in the *directories* of a member's path, and the whiteout pass
follows them everywhere.  So a layer with ``escape -> /home/me`` followed by one with
``escape/.bashrc`` writes onto the host, and ``x/.wh..wh..opq`` under such a symlink empties a
host directory.

:class:`StackChecker` reads the layers of one image, lowest first, and keeps a model of the
tree udocker builds (directories, files, symlinks).  It raises :class:`~.errors.UnsafeLayer`
naming the layer and member when

* a member name (whiteouts and hardlink targets included) is absolute or has a ``..``
  component, or a whiteout name is one that udocker would mangle (not printable ASCII,
  surrounding blanks, a target ``.``/``..``/empty, ``.wh.`` in a directory name);
* a member, a hardlink target or a whiteout goes *through* a symlink made by an earlier layer
  or earlier in the same layer (an opaque marker's own directory must not be a symlink
  either, since udocker lists it);
* a hardlink does not name an earlier member (a file or symlink already in the tree);
* a member is a character or block device that udocker would create (those under ``dev/``
  are excluded by udocker and never created), or of a type other than file, directory,
  symlink, hardlink, device or FIFO (GNU tar gives some of those a meaning of its own);
* the tar stream is unreadable or ambiguous (data after a damaged header or after the end
  marker, which GNU tar may read differently than this parser; a non-empty layer whose
  first block is not a tar header, which GNU tar rejects and this parser would read as an
  empty layer).

Before a member's data is read, its header must be one the extraction can apply exactly
(:func:`_check_header`, "unusable image": damaged or unusual, not an attack on the host):
no NUL in its name or link target (PAX headers can carry one), an mtime that is a finite
number within +-2**33 seconds (PAX allows ``1e400``), no ``/`` (or ``/.``) ending the name
of a non-directory or a hardlink's target, and not a sparse member.  Sparse members (GNU ``S`` headers, PAX
``GNU.sparse.*``) are refused rather than written with holes: image builders (docker,
buildkit, buildah, podman and kaniko all write through Go's ``archive/tar``, which writes
no sparse members) do not make them, only ``tar -S`` does, and a 1.5 KB member can claim
terabytes of zeros, which tarfile would write as real blocks.

A member is classified (whiteout, opaque marker or entry) by :func:`split_name`'s
normalised components, by this checker and by the extractor alike: the two can never
disagree on what a name means.

FIFOs are allowed (any user can make one; it reaches nothing outside the container).
Setuid/setgid bits are allowed: the extraction never sets them, as root or not (the tests
check it), as udocker's GNU tar with ``--no-same-permissions`` did not.

The model is conservative where udocker's behaviour is uncertain: a symlink is assumed to
exist until something certainly removed it, so an image is at worst refused, never let
through.  Pure: no I/O beyond reading the streams given to :meth:`StackChecker.check_layer`.
"""
import gzip
import math
import tarfile
import zlib

from ..errors import UdockerError, UnsafeLayer

__all__ = ["StackChecker", "plain_stream", "split_name", "is_whiteout"]

OPAQUE = ".wh..wh..opq"
WHITEOUT = ".wh."
DIR, FILE, LINK = "directory", "file", "symlink"
_DEVICES = (tarfile.CHRTYPE, tarfile.BLKTYPE)
_KNOWN_TYPES = tarfile.REGULAR_TYPES + _DEVICES + (tarfile.LNKTYPE, tarfile.SYMTYPE,
                                                  tarfile.DIRTYPE, tarfile.FIFOTYPE)


class _Node:
    __slots__ = ("kind", "children")

    def __init__(self, kind):
        self.kind = kind
        self.children = {} if kind == DIR else None


class _Refused(Exception):
    """Internal: why a member is refused (turned into UnsafeLayer with the layer's name).

    ``member``: the member, when it is refused while the stream is read; ``unusable``:
    the layer is damaged or unusual rather than an attack."""

    def __init__(self, reason, member=None, unusable=False):
        super().__init__(reason)
        self.member, self.unusable = member, unusable


def split_name(name, what="name"):
    """The components of a member name (or hardlink target) inside the root, ``.`` and
    empty ones dropped: THE reading of a name, the checker's and the extractor's.  An
    absolute name or a ``..`` component is refused (the checker's UnsafeLayer)."""
    return _parts(name, what)


def is_whiteout(parts):
    """Whether a member of these components (from :func:`split_name`) is a whiteout or
    opaque marker to udocker."""
    return bool(parts) and parts[-1].startswith(WHITEOUT)


def _parts(name, what="name"):
    """Components of a member name inside the root; refuse absolute names and ``..``."""
    if name.startswith("/"):
        raise _Refused("absolute %s" % what)
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _Refused("%s climbs out with '..'" % what)
    return parts


_MTIME_LIMIT = 2 ** 33      # seconds either side of 1970 (year 2242): fits every time_t


def _check_header(info):
    """Refuse a header the extraction cannot apply exactly (see the module doc); called
    before the member's data is read."""
    def refuse(reason):
        raise _Refused(reason, member=info, unusable=True)
    if "\x00" in info.name or "\x00" in info.linkname:
        refuse("a NUL character in its %s" % ("name" if "\x00" in info.name
                                               else "link target"))
    mtime = info.mtime
    if not isinstance(mtime, (int, float)) or not math.isfinite(mtime) \
            or abs(mtime) >= _MTIME_LIMIT:
        refuse("a modification time out of range (%r)" % (mtime,))
    if info.issparse() or any(k.startswith("GNU.sparse.") for k in info.pax_headers):
        refuse("a sparse file, which image builders do not write (rebuild the layer "
               "without 'tar -S')")
    if not info.isdir() and info.name.rpartition("/")[2] in ("", "."):
        refuse("a %s whose name ends in '/' or '/.', as only a directory's may"
               % _kind(info))
    if info.islnk() and info.linkname.rpartition("/")[2] in ("", "."):
        refuse("a hardlink whose target ends in '/' or '/.' (GNU tar would follow it)")


def _udocker_skips(parts):
    """True if udocker's tar excludes this member (``dev/*``, ``etc/udev/devices/*``)."""
    if "dev" in parts[:-1]:
        return True
    return any(parts[i:i + 3] == ["etc", "udev", "devices"] for i in range(len(parts) - 3))


class _Stream:
    """Decompress a layer read from ``raw`` (gzip, zstd or plain tar, told by its magic bytes,
    as GNU tar does)."""

    def __init__(self, raw):
        head = b""
        while len(head) < 4:
            chunk = raw.read(4 - len(head))
            if not chunk:
                break
            head += chunk
        self._head, self._raw = head, raw
        if head.startswith(b"\x1f\x8b"):
            self._inner = gzip.GzipFile(fileobj=self, mode="rb")
        elif head.startswith(b"\x28\xb5\x2f\xfd"):
            try:
                import zstandard
            except ImportError:
                raise _Refused("it is zstd-compressed: install the 'zstandard' package "
                               "to check it") from None
            self._inner = zstandard.ZstdDecompressor().stream_reader(
                self, read_across_frames=True)
        else:
            self._inner = None

    def read(self, size=-1):
        """Compressed bytes, for the decompressor (plain bytes when not compressed)."""
        if self._head:
            if size is None or size < 0:
                data, self._head = self._head + self._raw.read(), b""
                return data
            data, self._head = self._head[:size], self._head[size:]
            return data + (self._raw.read(size - len(data)) if size > len(data) else b"")
        return self._raw.read(size)

    def plain(self):
        return self._inner if self._inner is not None else self


def plain_stream(raw):
    """The tar bytes of a layer read from ``raw``, a readable binary stream (gzip, zstd or
    plain, told by the magic bytes as GNU tar does); its errors are the layer's."""
    return _Stream(raw).plain()


class _FirstBlock:
    """A binary stream that keeps the first 512 bytes read from it in ``first``."""

    def __init__(self, raw):
        self._raw, self.first = raw, b""

    def read(self, size=-1):
        data = self._raw.read(size)
        if len(self.first) < tarfile.BLOCKSIZE:
            self.first += data[:tarfile.BLOCKSIZE - len(self.first)]
        return data


class StackChecker:
    """Check the layers of one image in manifest order (see the module doc)."""

    def __init__(self):
        self.root = _Node(DIR)

    def check_layer(self, digest, stream, on_member=None, decompressed=False):
        """Read one layer from the binary ``stream`` (to the end of its tar) and check it
        against the layers checked before; raise UnsafeLayer naming ``digest``.

        Returns the layer's plan, what extracting it does to the tree in the model's
        order: its whiteouts that remove something, then its members that are extracted
        (TarInfo objects).  ``on_member(tar, info)``, if given, is called for every member
        as it is read (in stream mode: the member's data can be read then, and only then).
        With ``decompressed``, ``stream`` gives the bytes :func:`plain_stream` gives.
        """
        member = None
        try:
            members = self._read(stream, on_member, decompressed)
            plan = []
            for member in (m for m in members if self._is_whiteout(m)):
                if self._whiteout(member):
                    plan.append(member)
            for member in (m for m in members if not self._is_whiteout(m)):
                if self._member(member):
                    plan.append(member)
            return plan
        except _Refused as exc:
            member = exc.member or member
            where = "member %r" % member.name if member is not None else "its tar stream"
            if exc.unusable:
                raise UnsafeLayer(
                    "unusable image: layer %s, %s: %s; nothing was extracted (rebuild the "
                    "image with a standard tool)" % (digest, where, exc)) from None
            raise UnsafeLayer(
                "unsafe image: layer %s, %s: %s; it could write outside its container, "
                "so nothing was extracted (do not run this image)" % (digest, where, exc)
            ) from None

    # --- reading ---------------------------------------------------------------------------
    @staticmethod
    def _read(stream, on_member=None, decompressed=False):
        """The layer's members (metadata only), every header accounted for."""
        try:
            plain = _FirstBlock(stream if decompressed else plain_stream(stream))
            members, expected = [], 0
            # ignore_zeros: also read past the end marker and damaged headers, and refuse
            # anything found there (GNU tar may resynchronise on it)
            with tarfile.open(fileobj=plain, mode="r|", ignore_zeros=True,
                              bufsize=1 << 16) as tar:
                for info in tar:
                    if info.offset != expected:
                        raise _Refused("member %r follows a damaged header or the end of the "
                                       "archive" % info.name)
                    expected = tar.offset
                    _check_header(info)
                    members.append(info)
                    if on_member is not None:
                        on_member(tar, info)
            if not members and plain.first.strip(b"\0"):
                raise _Refused("it is not a tar archive (its first block is not a tar "
                               "header)", unusable=True)
            return members
        except (_Refused, UdockerError):    # UdockerError: on_member's own
            raise
        except (tarfile.TarError, OSError, EOFError, zlib.error, ValueError) as exc:
            raise _Refused("it is not a readable tar archive (%s)" % exc) from None
        except Exception as exc:        # noqa: BLE001 -- zstandard.ZstdError and the like
            raise _Refused("it is not a readable tar archive (%s: %s)"
                           % (type(exc).__name__, exc)) from None

    @staticmethod
    def _is_whiteout(info):
        try:
            return is_whiteout(split_name(info.name))
        except _Refused as exc:     # raised in a filter, before the loop names the member
            exc.member = info
            raise

    # --- the model -------------------------------------------------------------------------
    def _parent(self, parts, create, what="its path"):
        """The directory node holding ``parts[-1]``; refuse a path through a symlink.

        With ``create``, missing (or non-directory) components become directories, as GNU
        tar makes them; without, None when the path does not exist.
        """
        node, walked = self.root, []
        for part in parts[:-1]:
            walked.append(part)
            child = node.children.get(part)
            if child is not None and child.kind == LINK:
                raise _Refused("%s goes through the symlink %r"
                               % (what, "/".join(walked)))
            if child is None or child.kind != DIR:
                if not create:
                    return None
                child = node.children[part] = _Node(DIR)
            node = child
        return node

    def _whiteout(self, info):
        """udocker applies whiteouts before extracting the layer, in archive order."""
        name = info.name
        if info.isdir():
            raise _Refused("a whiteout marker that is a directory")
        if not (name.isascii() and name.isprintable()) or "\\" in name \
                or name != name.strip():
            raise _Refused("a whiteout name with unusual characters")
        parts = _parts(name)
        if any(p.startswith(WHITEOUT) for p in parts[:-1]):
            raise _Refused("a whiteout marker inside a whiteout-named directory")
        base = parts[-1]
        target = None if base == OPAQUE else base[len(WHITEOUT):]
        if target is not None and target in ("", ".", ".."):
            raise _Refused("a whiteout of %r" % (target or "its own directory"))
        if "/" not in name:
            return False        # udocker's '*/.wh.*' does not list it: nothing is removed
        parent = self._parent(parts, create=False)
        if parent is None:
            return False
        if target is None:
            parent.children.clear()         # udocker lists the directory and empties it
            return True
        parent.children.pop(target, None)   # a symlink itself is removed, not followed
        return True

    def _member(self, info):
        if info.type not in _KNOWN_TYPES:
            # e.g. GNU dumpdir ('D') or volume ('V') entries, which GNU tar interprets
            raise _Refused("a member of type %r, never found in image layers"
                           % info.type.decode("latin-1"))
        parts = _parts(info.name)
        if any(p.startswith(WHITEOUT) for p in parts[:-1]):
            raise _Refused("a member inside a whiteout-named directory")
        if not parts:
            if info.isdir():
                return True     # the root directory itself (its mode)
            raise _Refused("a %s named like the root directory" % _kind(info))
        skipped = _udocker_skips(parts)
        if info.type in _DEVICES and not skipped:
            raise _Refused("a %s device node" % ("character" if info.ischr() else "block"))
        kind = DIR if info.isdir() else LINK if info.issym() else FILE
        if info.islnk():
            kind = self._hardlink_kind(info)
        parent = self._parent(parts, create=True)
        if skipped:
            if kind == LINK:    # never extracted, but remembered all the same
                parent.children[parts[-1]] = _Node(kind)
            return False
        name = parts[-1]
        old = parent.children.get(name)
        if old is not None and old.kind == DIR:
            if kind == DIR:
                return True     # an existing directory is kept, with its content
            if kind != LINK and old.children:
                return False    # tar cannot replace a non-empty directory by a file
        parent.children[name] = _Node(kind)
        return True

    def _hardlink_kind(self, info):
        parts = _parts(info.linkname, "hardlink target")
        if not parts:
            raise _Refused("a hardlink to the root directory")
        parent = self._parent(parts, create=False, what="its hardlink target")
        target = parent.children.get(parts[-1]) if parent is not None else None
        if target is None:
            raise _Refused("a hardlink to %r, which is not an earlier member"
                           % info.linkname)
        if target.kind == DIR:
            raise _Refused("a hardlink to the directory %r" % info.linkname)
        return target.kind


def _kind(info):
    return "symlink" if info.issym() else "hardlink" if info.islnk() else "file"
