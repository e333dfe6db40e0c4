"""Our bookkeeping in udocker's directory: image names, verified blobs, old feeds.

Containers are created by :mod:`.extract` (udocker's ``create`` is not used): each
records its image as udocker does in ``imagerepo.name``, under the repository name
``datalad-udocker/<manifest hex>`` and tag ``latest`` (:func:`repo_name`), by which the
container cache recognises containers made from our images.  Earlier versions fed images into
udocker's ``repos/`` (a tag directory of symlinks to the layout's blobs, for ``udocker
create``); :meth:`UdockerRepo.fed_digests` and :meth:`UdockerRepo.remove` let a prune
remove those.

Digest verification
-------------------
Every blob is verified before a container is made of it: a corrupt layer raises
:class:`~.errors.DigestMismatch` and nothing is created.  :mod:`.extract` hashes a layer
in the same read that checks and extracts it.  To keep the second execution mode (or a
re-creation after a prune) from hashing again, a blob that passed is remembered under
``datalad-udocker/verified/<hex>`` together with the device, inode, size, mtime and
ctime of the file that was hashed; a file that was replaced, written or touched since is
hashed again (ctime: even if its mtime was put back).  ``udocker-export`` trusts the
same memo.  git-annex objects are write-protected and never change in place, so this
memo is sound for them.
"""
import json
import os
from pathlib import Path

from ..digest import Digest, file_digest, hex_part
from ..errors import DigestMismatch, InvalidDigest
from .safe_delete import remove_tree

REPO_PREFIX = "datalad-udocker"
TAG = "latest"
STATE_DIR = "datalad-udocker"     # our own bookkeeping inside the udocker dir


def repo_name(manifest_digest):
    """udocker repository name for the image with this manifest digest."""
    return "%s/%s" % (REPO_PREFIX, hex_part(manifest_digest))


def repo_digest(name):
    """The manifest digest a udocker repository name (``repo`` or
    ``repo:tag``) made by :func:`repo_name` stands for, else None."""
    if not name.startswith(REPO_PREFIX + "/"):
        return None
    try:
        return Digest("sha256:" + name[len(REPO_PREFIX) + 1:].partition(":")[0])
    except InvalidDigest:
        return None


class UdockerRepo:
    """Verified blobs and old image feeds in the udocker directory ``udocker_dir``."""

    def __init__(self, udocker_dir):
        self.udocker_dir = Path(udocker_dir)
        self.repos_dir = self.udocker_dir / "repos"
        self.verified_dir = self.udocker_dir / STATE_DIR / "verified"

    def tag_dir(self, manifest_digest):
        return self.repos_dir / repo_name(manifest_digest) / TAG

    def remove(self, manifest_digest):
        """Forget an image an earlier version fed (its symlinks; the blobs are
        not touched)."""
        remove_tree(self.tag_dir(manifest_digest).parent,
                    self.repos_dir / REPO_PREFIX)

    def fed_digests(self):
        """Manifest digests of every image an earlier version fed."""
        base = self.repos_dir / REPO_PREFIX
        if not base.is_dir():
            return []
        found = (repo_digest("%s/%s" % (REPO_PREFIX, p.name))
                 for p in base.iterdir() if (p / TAG / "TAG").is_file())
        return sorted(d for d in found if d is not None)

    # --- verification ----------------------------------------------------
    def verification(self, path, digest, size):
        """``(stamp, verified)`` for the blob file ``path``: ``verified`` when the
        unchanged file already passed; else, once its content is found to hash to
        ``digest`` (:meth:`check_digest`), :meth:`remember` ``stamp``.  Raises
        DigestMismatch if the file is not ``size`` bytes long."""
        st = os.stat(path)
        stamp = {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size,
                 "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
                 "digest": str(digest)}
        try:
            if json.loads(self._memo(digest).read_text()) == stamp:
                return stamp, True
        except (OSError, ValueError):
            pass
        if st.st_size != size:
            raise DigestMismatch(
                "layer %s is corrupt (%d bytes, the manifest says %d): "
                "re-fetch it with `datalad get`" % (digest, st.st_size, size))
        return stamp, False

    @staticmethod
    def check_digest(digest, got):
        if got != digest:
            raise DigestMismatch(
                "layer %s is corrupt (its content hashes to %s): re-fetch it "
                "with `datalad get`" % (digest, got))

    def remember(self, stamp):
        """Remember a :meth:`verification` stamp of a blob that passed."""
        memo = self._memo(stamp["digest"])
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(".%s.%d" % (memo.name, os.getpid()))
        tmp.write_text(json.dumps(stamp))
        os.replace(tmp, memo)

    def _memo(self, digest):
        return self.verified_dir / Digest(digest).hex

    def verify_blob(self, path, digest, size):
        """Raise DigestMismatch unless ``path`` holds ``size`` bytes hashing
        to ``digest``; a previous success on the unchanged file is reused."""
        stamp, verified = self.verification(path, digest, size)
        if not verified:
            self.check_digest(digest, file_digest(path))
            self.remember(stamp)

    def forget_verified(self, digest):
        try:
            (self.verified_dir / hex_part(digest)).unlink()
        except FileNotFoundError:
            pass

