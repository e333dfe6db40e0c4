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
  a concurrent fetch of the same blob waits (at most ``lock_wait``
  seconds: anyone who can read the lock can hold it), then finds it in
  the cache.  The lock only saves downloads: correctness rests on writing
  each entry under a private temporary name in ``tmp/`` (created with
  O_EXCL|O_NOFOLLOW, its mode set on the descriptor) and renaming it into
  place, so a reader sees a whole entry or none, whoever wins.
- **No path through another's symlink.**  The subdirectories are opened
  with O_NOFOLLOW and must belong to the root's owner or the user; all
  file operations are relative to those descriptors.  A site directory
  others may write without the sticky bit is read, never filled.
- The cache is filled in the site directory when the user may write there,
  else in the user's own cache; a failure to fill it (disk full, no
  permission) is a warning, never a failed download.
"""
import contextlib
import errno
import fcntl
import logging
import os
import re
import secrets
import stat
import time

from .. import config
from ..digest import CHUNK, Digest, Hasher, HashingReader, check_hashed
from ..errors import DigestMismatch, UdockerError

lgr = logging.getLogger("datalad.udocker.blobcache")

_FALSE = ("false", "no", "off", "0")
_SUBDIRS = ("sha256", "tmp", "locks")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

#: seconds a fill waits for another process's lock on the same blob before
#: it downloads anyway (datalad.udocker.blob-cache-lock-wait)
LOCK_WAIT = 300
#: a temporary file of ours unchanged (ctime) this long was left by a
#: process that died: a live one writes, links or renames it within minutes
STALE_AFTER = 6 * 3600
_TEMP_NAME = re.compile(r"^(?:[0-9a-f]{64}|\.blobcache-)\.[0-9a-f]{16}\.tmp$")

_warned = set()


def _warn_once(msg, *args):
    text = msg % args
    if text not in _warned:
        _warned.add(text)
        lgr.warning("%s", text)


def user_cache_root():
    """The user's own blob cache: ``$XDG_CACHE_HOME/datalad-udocker/blobs``."""
    return os.path.join(config.cache_dir(), "blobs")


class _Unusable(Exception):
    """The cache directory is not safe to use at all (see CacheDir.opened)."""


class CacheDir:
    """One cache directory: ``sha256/<hex>`` entries, ``tmp/``, ``locks/``.

    ``shared``: a site directory (entries may belong to others; never
    hardlinked into an annex).  Every operation works on descriptors of its
    root and subdirectories (:meth:`opened`), never on paths through them.
    """

    def __init__(self, root, shared=False, lock_wait=LOCK_WAIT):
        self.root, self.shared, self.lock_wait = root, shared, lock_wait

    def __repr__(self):
        return "%s cache %s" % ("site" if self.shared else "user", self.root)

    def entry(self, digest):
        return os.path.join(self.root, "sha256", Digest(digest).hex)

    def _sub(self, name):
        return os.path.join(self.root, name)

    @contextlib.contextmanager
    def opened(self, create=False):
        """``{"root", "sha256", "tmp", "locks": descriptor or None}``.

        The root is the directory the user named; its subdirectories are
        opened without following symlinks and must belong to the root's
        owner or to the user, else _Unusable (someone who could replace
        them could make every path operation land outside the cache).
        ``create``: make the user cache (mode 0700) and missing
        subdirectories where we may (the root of a site directory must
        exist: the admin makes it)."""
        fds = {}
        try:
            if create and not self.shared:
                os.makedirs(self.root, mode=0o700, exist_ok=True)
            fds["root"] = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY
                                  | os.O_CLOEXEC)
            owner = os.fstat(fds["root"]).st_uid
            for name in _SUBDIRS:
                fds[name] = self._open_sub(fds["root"], name, create)
                if fds[name] is None:
                    continue
                uid = os.fstat(fds[name]).st_uid
                if uid not in (owner, os.geteuid()):
                    raise _Unusable("%s belongs to uid %d, neither to the "
                                    "owner of %s nor to you"
                                    % (self._sub(name), uid, self.root))
            yield fds
        finally:
            for fd in fds.values():
                if fd is not None:
                    os.close(fd)

    def _open_sub(self, root_fd, name, create):
        for attempt in (0, 1):
            try:
                return os.open(name, _DIR_FLAGS, dir_fd=root_fd)
            except FileNotFoundError:
                if not create or attempt:
                    return None
                try:
                    os.mkdir(name, 0o777 if self.shared else 0o700,
                             dir_fd=root_fd)
                except FileExistsError:
                    pass
                except OSError:
                    return None
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise _Unusable("%s is a symlink or not a directory"
                                    % self._sub(name))
                raise
        return None

    def fill_problem(self, fds):
        """Why we must not fill this cache (None: we may).  Not writable by
        us is silent; writable but unsafe (a directory others may write
        without the sticky bit: they could swap our files there) is said
        once, with what to do."""
        if any(fds[name] is None for name in _SUBDIRS) or not all(
                os.access(name, os.W_OK | os.X_OK, dir_fd=fds["root"])
                for name in _SUBDIRS):
            return "not writable by you"
        for name in ("root",) + _SUBDIRS:
            mode = os.fstat(fds[name]).st_mode
            if mode & 0o022 and not mode & stat.S_ISVTX:
                where = self.root if name == "root" else self._sub(name)
                _warn_once("not filling the %r: %s is writable by others "
                           "without the sticky bit, so they could swap your "
                           "files there; whoever keeps it should run "
                           "`chmod +t` on it and its sha256, tmp and locks",
                           self, where)
                return "writable by others without the sticky bit"
        return None

    @contextlib.contextmanager
    def lock(self, fds, digest):
        """Hold ``locks/<hex>`` while filling, waiting at most
        ``lock_wait`` seconds for another holder; without a lock when it
        cannot be taken in time (the lock only saves downloads: anyone who
        may read the lock file may hold it)."""
        name = Digest(digest).hex
        try:
            # O_NONBLOCK: a FIFO planted there does not block the open
            fd = os.open(name, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW
                         | os.O_NONBLOCK | os.O_CLOEXEC, 0o660,
                         dir_fd=fds["locks"])
        except OSError as exc:
            lgr.debug("no lock %s/%s (%s): filling the cache without it",
                      self._sub("locks"), name, exc)
            yield
            return
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode) and self._wait_lock(fd, digest):
                self._remove_stale(fds, digest)
            yield
        finally:
            os.close(fd)

    def _wait_lock(self, fd, digest):
        deadline = time.monotonic() + self.lock_wait
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if not waited:
                lgr.info("waiting for another download of %s into %r",
                         digest, self)
                waited = True
            if time.monotonic() >= deadline:
                lgr.warning("the lock on %s in the %r is still held after "
                            "%d s: downloading it without waiting (set "
                            "datalad.udocker.blob-cache-lock-wait to wait "
                            "longer)", digest, self, self.lock_wait)
                return False
            time.sleep(0.2)       # poll: flock has no timeout

    def _remove_stale(self, fds, digest):
        """Remove our temporary files for ``digest`` (lock held): left by a
        filler that was killed, since a live one holds the lock."""
        prefix = Digest(digest).hex + "."
        _remove_own_temps(fds["tmp"], lambda name, st: name.startswith(prefix))

    def put(self, fds, src, digest, size, may_link):
        """File the verified blob ``src`` as this cache's entry for
        ``digest``: hardlinked (``may_link``, same file system) or copied
        (and checked as it is copied) into a new file of ours in ``tmp/``
        (mode 0444: readable by the site's users), then renamed into
        place.  Our own temporary files older than STALE_AFTER go first."""
        tmp_fd, name = fds["tmp"], Digest(digest).hex
        _remove_stale_temps(tmp_fd)
        tmp = None
        try:
            if may_link:
                tmp = _free_name(name)
                try:
                    os.link(src, tmp, dst_dir_fd=tmp_fd)
                except OSError:
                    tmp = None
            if tmp is None:
                with open(src, "rb") as f:
                    tmp = _copy_verified(f, digest, size, tmp_fd, name, 0o444)
            os.replace(tmp, name, src_dir_fd=tmp_fd, dst_dir_fd=fds["sha256"])
            tmp = None
        finally:
            if tmp is not None:
                _unlink(tmp, tmp_fd)


class BlobCache:
    """The caches a fetch consults, in order (user's own, then site's)."""

    def __init__(self, dirs):
        self.dirs = list(dirs)

    @classmethod
    def configured(cls, dataset=None):
        """The caches the user's own settings name (config.get: never a
        dataset's committed config)."""
        dirs = []
        try:
            wait = float(config.get("blob-cache-lock-wait", LOCK_WAIT, dataset))
        except ValueError:
            raise UdockerError("datalad.udocker.blob-cache-lock-wait must be "
                               "a number of seconds")
        if str(config.get("blob-cache", "true", dataset)).strip().lower() \
                not in _FALSE:
            dirs.append(CacheDir(user_cache_root(), lock_wait=wait))
        site = config.get("blob-cache-site", None, dataset)
        if site:
            site = os.path.abspath(os.path.expanduser(site))
            if os.path.isdir(site):
                dirs.append(CacheDir(site, shared=True, lock_wait=wait))
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
        with contextlib.ExitStack() as stack:
            fill = None
            for cache in reversed(self.dirs):
                try:
                    fds = stack.enter_context(cache.opened(create=True))
                    if cache.fill_problem(fds) is None:
                        fill = cache
                        break
                except _Unusable as exc:
                    _warn_once("not using the %r: %s", cache, exc)
                except OSError as exc:
                    lgr.debug("cannot fill the %r: %s", cache, exc)
            if fill is None:
                download(dest, progress)
                return False
            with fill.lock(fds, digest):
                # filled meanwhile by whoever held the lock?
                if self._take(digest, size, dest, may_link, progress):
                    return True
                download(dest, progress)
                try:
                    fill.put(fds, dest, digest, size,
                             may_link and not fill.shared)
                except (OSError, UdockerError) as exc:
                    lgr.warning("could not put blob %s into the %r: %s",
                                digest, fill, exc)
        return False

    def _take(self, digest, size, dest, may_link, progress):
        for cache in self.dirs:
            try:
                with cache.opened() as fds:
                    found = fds["sha256"] is not None and _take_from(
                        cache, fds["sha256"], digest, size, dest, may_link)
            except _Unusable as exc:
                _warn_once("not using the %r: %s", cache, exc)
                continue
            except FileNotFoundError:       # not made yet
                continue
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


def _take_from(cache, sha_fd, digest, size, dest, may_link):
    """Put ``cache``'s entry for ``digest`` (in the directory ``sha_fd``)
    at ``dest`` if it verifies; False (the entry discarded or ignored) if
    there is none or it does not."""
    name, path = digest.hex, cache.entry(digest)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                     | os.O_CLOEXEC, dir_fd=sha_fd)
    except FileNotFoundError:
        return False
    except OSError as exc:
        if exc.errno == errno.ELOOP:      # O_NOFOLLOW met a symlink
            _reject(cache, sha_fd, name, None, "is a symlink")
        else:
            lgr.debug("cannot read %s: %s", path, exc)
        return False
    dest = os.path.abspath(dest)
    dest_name = os.path.basename(dest)
    with os.fdopen(fd, "rb") as f:
        dest_dir = os.open(os.path.dirname(dest), os.O_RDONLY
                           | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                _reject(cache, sha_fd, name, st, "is not a regular file")
                return False
            if st.st_size != size:
                _reject(cache, sha_fd, name, st,
                        "has %d bytes, not %d" % (st.st_size, size))
                return False
            _remove_stale_temps(dest_dir)
            try:
                if (may_link and not cache.shared and st.st_uid == os.geteuid()
                        and _link_verified(sha_fd, name, path, st, digest,
                                           size, dest_dir, dest_name)):
                    return True
                tmp = _copy_verified(f, digest, size, dest_dir, ".blobcache-")
                os.replace(tmp, dest_name, src_dir_fd=dest_dir,
                           dst_dir_fd=dest_dir)
                return True
            except DigestMismatch:
                _reject(cache, sha_fd, name, st, "does not match its digest")
                return False
        finally:
            os.close(dest_dir)


def _link_verified(sha_fd, name, path, st, digest, size, dest_dir, dest_name):
    """Hardlink the entry ``name`` (the inode ``st``) into ``dest_dir`` as
    ``dest_name`` and verify it there.  False when it cannot be linked
    (another file system, the kernel's protected_hardlinks, a link limit):
    the caller copies."""
    tmp = _free_name(".blobcache-")
    try:
        os.link(name, tmp, src_dir_fd=sha_fd, dst_dir_fd=dest_dir,
                follow_symlinks=False)
    except OSError as exc:
        lgr.debug("cannot hardlink %s (%s): copying it", path, exc)
        return False
    try:
        # what we hash is the inode behind our own link: no one can swap it
        fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                     | os.O_CLOEXEC, dir_fd=dest_dir)
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
        os.replace(tmp, dest_name, src_dir_fd=dest_dir, dst_dir_fd=dest_dir)
        tmp = None
        return True
    finally:
        if tmp is not None:
            _unlink(tmp, dest_dir)


def _copy_verified(f, digest, size, dir_fd, prefix, mode=None):
    """Copy the open file ``f`` into a new file of ours in the directory
    ``dir_fd`` (created with O_EXCL|O_NOFOLLOW: nothing there is followed
    or reused; ``mode`` set on the descriptor), hashing it as it goes; its
    name.  Raises DigestMismatch (nothing left)."""
    tmp = _free_name(prefix)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                 | os.O_CLOEXEC, 0o600 if mode is not None else 0o666,
                 dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb") as out:
            hasher = Hasher()
            for chunk in iter(lambda: f.read(CHUNK), b""):
                hasher.update(chunk)
                if hasher.count > size:
                    break
                out.write(chunk)
            check_hashed(hasher, digest, size)
            if mode is not None:
                os.fchmod(out.fileno(), mode)
    except BaseException:
        _unlink(tmp, dir_fd)
        raise
    return tmp


def _reject(cache, dir_fd, name, st, why):
    """A bad entry: removed if it is ours, else left and reported."""
    path = os.path.join(cache.root, "sha256", name)
    try:
        now = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return
    ours = now.st_uid == os.geteuid()
    same = st is None or (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)
    if ours and same:
        _unlink(name, dir_fd)
        lgr.warning("discarded blob cache entry %s: it %s", path, why)
    elif same:
        lgr.warning("ignoring blob cache entry %s: it %s, and it is not yours "
                    "to delete; tell whoever keeps the %r", path, why, cache)


def _remove_stale_temps(dir_fd):
    """Remove our own temporary files in ``dir_fd`` unchanged for
    STALE_AFTER: left by a process that was killed."""
    limit = time.time() - STALE_AFTER
    _remove_own_temps(dir_fd, lambda name, st: st.st_ctime < limit)


def _remove_own_temps(dir_fd, stale):
    try:
        names = [n for n in os.listdir(dir_fd) if _TEMP_NAME.match(n)]
    except OSError:
        return
    for name in names:
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if (st.st_uid == os.geteuid() and stat.S_ISREG(st.st_mode)
                    and stale(name, st)):
                _unlink(name, dir_fd)
        except OSError:
            pass


def _free_name(prefix):
    """A new name (nothing created) for a temporary file."""
    return "%s.%s.tmp" % (prefix, secrets.token_hex(8))


def _unlink(name, dir_fd=None):
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
