"""Files of an image directory or tar, read by member name, safely.

An OCI layout or a ``docker save`` archive is a set of named files
(*members*: ``index.json``, ``blobs/sha256/<hex>``, ``manifest.json``...)
whether it is a directory or a tar.  :class:`DirReader` and
:class:`TarReader` give the same read-only access to both, so the formats
(:mod:`.dataset.layout`, :mod:`.archive.docker_archive`) never care which
it is.  Member names are checked like archive paths (:func:`normalize`);
nothing is ever extracted or written.
"""
import io
import json
import os
import posixpath
import re
import tarfile

from .errors import ArchiveError

MAX_JSON = 64 << 20          # refuse absurd JSON members (manifest, config)


def normalize(name, what="member", error=ArchiveError):
    """Archive-relative POSIX path, or ``error`` if it is unsafe."""
    if name.startswith("/") or re.match(r"^[A-Za-z]:[\\/]", name):
        raise error("unsafe archive: %s %r is an absolute path"
                    % (what, name))
    if "\\" in name or "\x00" in name:
        raise error("unsafe archive: %s %r has a backslash or NUL"
                    % (what, name))
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise error("unsafe archive: %s %r leaves the archive (..)"
                    % (what, name))
    return "/".join(parts)


class Members:
    """What both readers share: ``read``, ``read_json`` and ``with``.

    A subclass has ``path``, ``error`` (the UdockerError class it raises)
    and ``exists``, ``size`` (``error`` if absent) and ``open``.
    """
    error = ArchiveError

    def read(self, name, limit=MAX_JSON):
        size = self.size(name)
        if size > limit:
            raise self.error("%s: %r is too large (%d bytes)"
                             % (self.path, name, size))
        with self.open(name) as f:
            return f.read()

    def read_json(self, name):
        try:
            return json.loads(self.read(name))
        except ValueError:
            raise self.error("%s in %s is not valid JSON"
                             % (name, self.path)) from None

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class DirReader(Members):
    """Read files of a directory by archive-style relative names.

    Names are checked like archive members (no absolute paths, no ``..``);
    symlinks are followed (a dataset's layout has annexed layers), since
    nothing here writes anywhere.  ``error`` is the error class raised
    (ArchiveError for an image source, LayoutError for a dataset's layout).
    """

    def __init__(self, path, error=ArchiveError):
        self.path, self.error = str(path), error
        if not os.path.isdir(self.path):
            raise error("%s is not a directory holding an OCI image layout"
                        % self.path)

    def _p(self, name):
        return os.path.join(self.path, *normalize(name, error=self.error)
                            .split("/"))

    def exists(self, name):
        return os.path.isfile(self._p(name))

    def size(self, name):
        if not self.exists(name):
            raise self.error("%s refers to %r, which it does not contain "
                             "(layer content not present? try `datalad "
                             "get`)" % (self.path, name))
        return os.stat(self._p(name)).st_size

    def open(self, name):
        try:
            return open(self._p(name), "rb")
        except OSError as exc:
            raise self.error("cannot read %s from %s: %s"
                             % (name, self.path, exc.strerror))


class TarReader(Members):
    """Random read access to the members of a tar file, checked for safety.

    Refuses absolute paths, ``..`` components, device nodes and FIFOs,
    links that leave the archive, duplicate names, and truncated or corrupt
    tars (ArchiveError); links are followed when a member is read.
    """

    def __init__(self, path):
        self.path = str(path)
        try:
            self._tar = tarfile.open(self.path, "r:*")
            infos = self._tar.getmembers()
        except FileNotFoundError:
            raise ArchiveError("archive %s does not exist" % self.path)
        except IsADirectoryError:
            raise ArchiveError("%s is a directory, not an archive (use "
                               "oci:DIR for an OCI layout)" % self.path)
        except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
            raise ArchiveError("%s is not a readable tar archive (truncated "
                               "or corrupt?): %s" % (self.path, exc))
        self._members = {}
        for info in infos:
            name = normalize(info.name)
            if info.isdir():
                continue
            if not (info.isreg() or info.issym() or info.islnk()):
                raise ArchiveError(
                    "unsafe archive %s: member %r is a device node, FIFO or "
                    "other special file" % (self.path, info.name))
            if name in self._members:
                raise ArchiveError("ambiguous archive %s: member %r appears "
                                   "twice" % (self.path, name))
            if info.issym():
                self._link_target(name, info.linkname)
            elif info.islnk():
                normalize(info.linkname, "hard link %r target" % name)
            self._members[name] = info

    def _link_target(self, name, target):
        """The archive path a symlink ``name`` -> ``target`` points to."""
        if target.startswith("/"):
            raise ArchiveError("unsafe archive %s: symlink %r points to an "
                               "absolute path" % (self.path, name))
        joined = posixpath.normpath(posixpath.join(posixpath.dirname(name),
                                                   target))
        if joined == ".." or joined.startswith("../"):
            raise ArchiveError("unsafe archive %s: symlink %r -> %r leaves "
                               "the archive" % (self.path, name, target))
        return normalize(joined)

    def close(self):
        self._tar.close()

    def _resolve(self, name):
        name = normalize(name)
        for _ in range(16):
            info = self._members.get(name)
            if info is None:
                return None
            if info.isreg():
                return info
            if info.issym():
                name = self._link_target(name, info.linkname)
            else:
                name = normalize(info.linkname)
        raise ArchiveError("archive %s: too many levels of links at %r"
                           % (self.path, name))

    def exists(self, name):
        return self._resolve(name) is not None

    def size(self, name):
        return self._info(name).size

    def _info(self, name):
        info = self._resolve(name)
        if info is None:
            raise ArchiveError("archive %s refers to %r, which it does not "
                               "contain" % (self.path, name))
        return info

    def open(self, name):
        """A binary file object reading member ``name`` (links followed)."""
        return _CheckedReader(self._tar.extractfile(self._info(name)),
                              self.path, name)


class _CheckedReader(io.RawIOBase):
    """Turn tarfile's errors on short data into ArchiveError."""

    def __init__(self, f, path, name):
        self._f, self._where = f, "%s in %s" % (name, path)

    def readable(self):
        return True

    def read(self, n=-1):
        try:
            return self._f.read(n)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise ArchiveError("cannot read %s (truncated or corrupt "
                               "archive?): %s" % (self._where, exc))

    def readinto(self, b):
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def close(self):
        self._f.close()
        super().close()
