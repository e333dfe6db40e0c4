"""A content-addressed cache of registry blobs: download a layer once per
machine (or site), not once per clone.

``udocker-import`` and the registry special remote both fetch a layer
through :meth:`BlobCache.fetch`: it looks for ``sha256/<hex>`` in the
user's cache (``$XDG_CACHE_HOME/datalad-udocker/blobs``, unless
``datalad.udocker.blob-cache`` is false) and then in the site directory
(``datalad.udocker.blob-cache-site``), and only if neither has a good copy
asks the registry, then files what it downloaded into the cache.

- **Verified on use.**  An entry is trusted only after its bytes hashed to
  its digest (:mod:`..digest`'s verifying stream), every time it is used: a
  shared site directory may have been written by someone else, and a
  hardlinked entry shares its bytes with annex objects.  An entry that is
  not a regular file (a symlink, a FIFO), has the wrong size or the wrong
  digest is discarded if it is ours, ignored with a warning if it is not,
  and the blob comes from the registry.
- **Hardlinks only where nothing can damage them.**  An entry of the user's
  own cache, owned by the user, becomes the annex object by a hardlink
  (no copy, no extra disk) when the caller says the repository's object
  handling leaves its objects alone (see ``annex.may_link_objects``) and
  the file system allows it; otherwise it is copied.  Site entries are
  always copied, both ways: no annex object ever shares an inode with
  another user's file, and git-annex's mode changes (read-only objects,
  thawing before a drop) never reach the site directory.
- **One download per blob at a time.**  The filler takes an exclusive
  ``flock`` on ``locks/<hex>`` in the cache it fills while it downloads;
  a concurrent fetch of the same blob waits, then finds it in the cache.
  The lock only saves downloads: correctness rests on writing each entry
  under a private temporary name in ``tmp/`` and renaming it into place,
  so a reader sees a whole entry or none, whoever wins.
- The cache is filled in the site directory when the user may write there,
  else in the user's own cache; a failure to fill it (disk full, no
  permission) is a warning, never a failed download.
"""
import contextlib
import errno
import fcntl
import logging
import os
import secrets
import stat

from .. import config
from ..digest import CHUNK, Digest, HashingReader, VerifyingWriter
from ..errors import DigestMismatch, UdockerError

lgr = logging.getLogger("datalad.udocker.blobcache")

_FALSE = ("false", "no", "off", "0")


def user_cache_root():
    """The user's own blob cache: ``$XDG_CACHE_HOME/datalad-udocker/blobs``."""
    return os.path.join(config.cache_dir(), "blobs")


class CacheDir:
    """One cache directory: ``sha256/<hex>`` entries, ``tmp/``, ``locks/``.

    ``shared``: a site directory (entries may belong to others; never
    hardlinked into an annex).
    """

    def __init__(self, root, shared=False):
        self.root, self.shared = root, shared

    def __repr__(self):
        return "%s cache %s" % ("site" if self.shared else "user", self.root)

    def entry(self, digest):
        return os.path.join(self.root, "sha256", Digest(digest).hex)

    def _sub(self, name):
        return os.path.join(self.root, name)

    def writable(self):
        """Can we fill this cache (write in its ``sha256``, ``tmp`` and
        ``locks``)?  Creates the user cache (mode 0700), and the
        subdirectories of a site directory whose root we may write (the
        root itself must exist: the admin makes it)."""
        if not self.shared:
            try:
                os.makedirs(self.root, mode=0o700, exist_ok=True)
            except OSError:
                return False
        subs = [self._sub(name) for name in ("sha256", "tmp", "locks")]
        for sub in subs:
            if not os.path.isdir(sub):
                try:
                    os.mkdir(sub, 0o777 if self.shared else 0o700)
                except FileExistsError:
                    pass
                except OSError:
                    return False
        return all(os.access(sub, os.W_OK | os.X_OK) for sub in subs)

    @contextlib.contextmanager
    def lock(self, digest):
        """Hold ``locks/<hex>`` while filling; without a lock when it
        cannot be taken (the lock only saves downloads)."""
        path = os.path.join(self._sub("locks"), Digest(digest).hex)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            lgr.debug("no lock %s (%s): filling the cache without it", path, exc)
            yield
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                lgr.info("waiting for another download of %s into %r",
                         digest, self)
                fcntl.flock(fd, fcntl.LOCK_EX)
            self._remove_stale(digest)
            yield
        finally:
            os.close(fd)

    def _remove_stale(self, digest):
        """Remove our temporary files for ``digest`` (lock held): left by a
        filler that was killed, since a live one holds the lock."""
        tmp = self._sub("tmp")
        prefix = Digest(digest).hex + "."
        try:
            names = [n for n in os.listdir(tmp) if n.startswith(prefix)]
        except OSError:
            return
        for name in names:
            path = os.path.join(tmp, name)
            try:
                if os.lstat(path).st_uid == os.geteuid():
                    _unlink(path)
            except OSError:
                pass

    def put(self, src, digest, size, may_link):
        """File the verified blob ``src`` as this cache's entry for
        ``digest``: hardlinked (``may_link``, same file system) or copied
        (and checked as it is copied), under a temporary name, then renamed
        into place."""
        tmp = None
        try:
            if may_link:
                tmp = _free_name(self._sub("tmp"), Digest(digest).hex)
                try:
                    os.link(src, tmp)
                except OSError:
                    tmp = None
            if tmp is None:
                with open(src, "rb") as f:
                    tmp = _copy_verified(f, digest, size, self._sub("tmp"),
                                         Digest(digest).hex)
                os.chmod(tmp, 0o444)     # readable by the site's users
            os.replace(tmp, self.entry(digest))
            tmp = None
        finally:
            if tmp is not None:
                _unlink(tmp)


class BlobCache:
    """The caches a fetch consults, in order (user's own, then site's)."""

    def __init__(self, dirs):
        self.dirs = list(dirs)

    @classmethod
    def configured(cls, dataset=None):
        """The caches the user's own settings name (config.get: never a
        dataset's committed config)."""
        dirs = []
        if str(config.get("blob-cache", "true", dataset)).strip().lower() \
                not in _FALSE:
            dirs.append(CacheDir(user_cache_root()))
        site = config.get("blob-cache-site", None, dataset)
        if site:
            site = os.path.abspath(os.path.expanduser(site))
            if os.path.isdir(site):
                dirs.append(CacheDir(site, shared=True))
            else:
                lgr.warning("the site blob cache %s (datalad.udocker."
                            "blob-cache-site) is not a directory; ignored",
                            site)
        return cls(dirs)

    def __bool__(self):
        return bool(self.dirs)

    def fetch(self, digest, size, dest, download, progress=None,
              may_link=False):
        """Make ``dest`` hold the verified blob ``digest`` of ``size`` bytes.

        From a cache if one has a good copy, else by
        ``download(dest, progress)`` (which verifies), then filed into the
        cache.  ``may_link``: ``dest`` may share its inode with an entry of
        the user's own cache.  True if the blob came from a cache.
        """
        digest = Digest(digest)
        if self._take(digest, size, dest, may_link, progress):
            return True
        fill = next((d for d in reversed(self.dirs) if d.writable()), None)
        if fill is None:
            download(dest, progress)
            return False
        with fill.lock(digest):
            # filled meanwhile by whoever held the lock?
            if self._take(digest, size, dest, may_link, progress):
                return True
            download(dest, progress)
            try:
                fill.put(dest, digest, size, may_link and not fill.shared)
            except (OSError, UdockerError) as exc:
                lgr.warning("could not put blob %s into the %r: %s",
                            digest, fill, exc)
        return False

    def _take(self, digest, size, dest, may_link, progress):
        for cache in self.dirs:
            try:
                found = _take_from(cache, digest, size, dest, may_link)
            except OSError as exc:
                lgr.warning("could not use the %r for %s: %s", cache, digest,
                            exc)
                continue
            if found:
                lgr.debug("blob %s from the %r", digest, cache)
                if progress is not None:
                    progress(size)
                return True
        return False


def _take_from(cache, digest, size, dest, may_link):
    """Put ``cache``'s entry for ``digest`` at ``dest`` if it verifies;
    False (the entry discarded or ignored) if there is none or it does not."""
    path = cache.entry(digest)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                     | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError as exc:
        if exc.errno == errno.ELOOP:      # O_NOFOLLOW met a symlink
            _reject(cache, path, None, "is a symlink")
        else:
            lgr.debug("cannot read %s: %s", path, exc)
        return False
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            _reject(cache, path, st, "is not a regular file")
            return False
        if st.st_size != size:
            _reject(cache, path, st, "has %d bytes, not %d" % (st.st_size, size))
            return False
        try:
            if (may_link and not cache.shared and st.st_uid == os.geteuid()
                    and _link_verified(path, st, digest, size, dest)):
                return True
            tmp = _copy_verified(f, digest, size,
                                 os.path.dirname(os.path.abspath(dest)),
                                 ".blobcache-")
            os.replace(tmp, dest)
            return True
        except DigestMismatch:
            _reject(cache, path, st, "does not match its digest")
            return False


def _link_verified(path, st, digest, size, dest):
    """Hardlink ``path`` (the inode ``st``) to ``dest`` and verify it
    there.  False when it cannot be linked (another file system, the
    kernel's protected_hardlinks, a link limit): the caller copies."""
    tmp = _free_name(os.path.dirname(os.path.abspath(dest)), ".blobcache-")
    try:
        os.link(path, tmp, follow_symlinks=False)
    except OSError as exc:
        lgr.debug("cannot hardlink %s (%s): copying it", path, exc)
        return False
    try:
        # what we hash is the inode behind our own link: no one can swap it
        fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                     | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            got = os.fstat(f.fileno())
            if (got.st_dev, got.st_ino) != (st.st_dev, st.st_ino):
                raise DigestMismatch("cache entry %s was replaced while it "
                                     "was used" % path)
            reader = HashingReader(f)
            reader.drain()
        if reader.count != size or reader.digest != digest:
            raise DigestMismatch("cache entry %s does not match its digest"
                                 % path)
        os.replace(tmp, dest)
        tmp = None
        return True
    finally:
        if tmp is not None:
            _unlink(tmp)


def _copy_verified(f, digest, size, directory, prefix):
    """Copy the open file ``f`` into a new file in ``directory`` through a
    VerifyingWriter; its path.  Raises DigestMismatch (nothing left)."""
    tmp = _free_name(directory, prefix)
    try:
        with VerifyingWriter(tmp, digest, size) as writer:
            for chunk in iter(lambda: f.read(CHUNK), b""):
                writer.write(chunk)
            writer.verify()
    except BaseException:
        _unlink(tmp)
        raise
    return tmp


def _reject(cache, path, st, why):
    """A bad entry: removed if it is ours, else left and reported."""
    try:
        now = os.lstat(path)
    except OSError:
        return
    ours = now.st_uid == os.geteuid()
    same = st is None or (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)
    if ours and same:
        _unlink(path)
        lgr.warning("discarded blob cache entry %s: it %s", path, why)
    elif same:
        lgr.warning("ignoring blob cache entry %s: it %s, and it is not yours "
                    "to delete; tell whoever keeps the %r", path, why, cache)


def _free_name(directory, prefix):
    """A path in ``directory`` that did not exist (nothing created)."""
    return os.path.join(directory, "%s.%s.tmp" % (prefix, secrets.token_hex(8)))


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
