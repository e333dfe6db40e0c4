"""git-annex-remote-udocker: a read-only special remote for registry blobs.

Layers imported by ``datalad udocker-import`` have their registry blob URL
(``http[s]://HOST/v2/REPOSITORY/blobs/sha256:HEX``) registered in git-annex.
This remote claims such URLs and fetches them through the registry client
(token/Basic auth from ``~/.docker/config.json`` or containers' auth.json,
redirects without credentials, retries, Range resume, digest check).
It is initialised with ``autoenable=true``, so ``datalad clone`` enables it
and ``datalad get`` just works.  It cannot store or remove anything.

A layer already in the user's or the site's blob cache (``blobcache``) is
taken from there, verified, instead of the registry; one downloaded is put
there for the next clone.

One process serves a whole ``git annex get``: the trusted settings are read
once in ``prepare()`` and there is one :class:`RegistryClient` per registry
for the session, so credentials are looked up and a token is fetched once per
registry (and repository scope), not once per layer.  DataLad is never
imported: the remote starts in a fraction of a second.

git-annex asks for one key at a time (``datalad get`` passes no ``-J``): a
large layer is fetched as ``datalad.udocker.jobs`` byte ranges at once
(:meth:`.RegistryClient.download_blob` ``parts``), hashed once, in order.

When a registry is gone (nobody listening, or the image deleted) the remote
says so quickly, and git-annex goes on to the next remote that has the layer
(a RIA store, a clone, a directory remote): a registry that could not be
reached is not asked again for :data:`UNREACHABLE_FOR` seconds.  Its cost
(:data:`COST`) puts it after every ordinary remote, so a layer held by a RIA
store or a clone is taken from there, not from the registry.

Set up by hand (the import command does this for you)::

    git annex initremote udocker-registry type=external externaltype=udocker \
        encryption=none autoenable=true
"""
import logging
import os
import time

from annexremote import Master, RemoteError, SpecialRemote

from .. import config
from .annex import may_link_objects, trust_remote_verification
from .blobcache import BlobCache
from ..digest import digest_from_key
from ..errors import NotFoundError, RegistryError, UdockerError
from ..registry.urls import parse_blob_url

lgr = logging.getLogger("datalad.udocker.special_remote")


def is_blob_url(url):
    try:
        parse_blob_url(url)
        return True
    except (ValueError, UdockerError):
        return False


#: git-annex's cost for this remote: above "expensive" (200: ssh, http, S3,
#: an ssh RIA store), so that any other remote holding a layer is tried
#: first (no registry pull counted, no waiting on a registry that is gone);
#: ``remote.udocker-registry.annex-cost`` overrides it
COST = 250

#: seconds during which a registry that could not be reached is not asked
#: again (its keys fail at once, so git-annex moves on to the next remote)
UNREACHABLE_FOR = 60.0


def _registry_of(url):
    """``host[:port]`` of a blob URL: the unit a client and a token serve."""
    return parse_blob_url(url)[0].split("://", 1)[1]


def _unreachable(exc):
    """No HTTP answer at all, after the transport's own retries."""
    return (isinstance(exc, RegistryError) and exc.status is None
            and exc.temporary)


class RegistryBlobRemote(SpecialRemote):
    """Protocol in, registry client out; each method a few lines."""

    def __init__(self, annex):
        super().__init__(annex)
        self._insecure = None
        self._parts = 1            # byte ranges fetched at once per blob
        self._clients = {}         # registry host -> RegistryClient
        self._down = {}            # registry host -> (monotonic time, message)
        self._cache = BlobCache(())
        self._may_link = False

    def initremote(self):
        # this remote checks every byte against the key's digest: git-annex
        # need not hash it again (also run when a clone autoenables it)
        trust_remote_verification(self.annex.getgitdir(),
                                  self.annex.getconfig("name"))

    def prepare(self):
        # plain http only where the user's own settings allow it (loopback,
        # datalad.udocker.insecure-registries): an http:// URL in a cloned
        # dataset must not downgrade a remote registry
        try:
            with config.reading_once():     # one `git config` call
                self._insecure = config.insecure_registries()
                self._parts = config.download_jobs()
                # layers already on this machine (or site) are not downloaded
                # again: see blobcache
                self._cache = BlobCache.configured()
        except UdockerError as exc:
            raise RemoteError(str(exc))
        # git-annex runs us in the work tree with a relative GIT_DIR: git
        # commands must run here, not in the git dir
        self._may_link = bool(self._cache) and may_link_objects(os.getcwd())

    def _down_since(self, registry):
        """Why ``registry`` was unreachable less than UNREACHABLE_FOR s ago."""
        when, message = self._down.get(registry, (None, None))
        if when is not None and time.monotonic() - when < UNREACHABLE_FOR:
            return message
        return None

    def _client(self, url):
        """The session's client for the registry of ``url``."""
        registry = _registry_of(url)
        down = self._down_since(registry)
        if down:
            raise RegistryError("%s (not asked again for %d s)"
                                % (down, UNREACHABLE_FOR), temporary=True)
        client = self._clients.get(registry)
        if client is None:
            from ..registry.client import RegistryClient   # loads requests
            client = self._clients[registry] = RegistryClient.for_url(
                url, insecure_registries=self._insecure)
        return client

    def _failed(self, url, exc):
        """Note ``exc`` for ``url``; its message for git-annex."""
        registry = _registry_of(url)
        if _unreachable(exc) and not self._down_since(registry):
            self._down[registry] = (time.monotonic(), str(exc))
        return str(exc)

    def getcost(self):
        return COST

    def claimurl(self, url):
        return is_blob_url(url)

    def checkurl(self, url):
        return is_blob_url(url)

    def _urls(self, key):
        digest, _ = digest_from_key(key)
        urls = [u.lstrip(":") for u in self.annex.geturls(key, "")]
        return [u for u in urls if is_blob_url(u) and parse_blob_url(u)[2] == digest]

    def transfer_retrieve(self, key, filename):
        digest, size = digest_from_key(key)
        urls = self._urls(key)
        if not urls:
            raise RemoteError("no registry URL is recorded for %s" % key)
        done = [0]

        def progress(n):
            done[0] += n
            self.annex.progress(done[0])

        def download(dest, progress):
            errors = []
            for url in urls:
                try:
                    self._client(url).download_blob(url, digest, size, dest,
                                                    progress, parts=self._parts)
                    return
                except UdockerError as exc:
                    errors.append(self._failed(url, exc))
            raise RemoteError("; ".join(errors))
        self._cache.fetch(digest, size, filename, download, progress,
                          self._may_link)

    def checkpresent(self, key):
        errors = []
        for url in self._urls(key):
            try:
                if self._client(url).blob_exists(url):
                    return True
            except NotFoundError:
                continue
            except UdockerError as exc:
                errors.append(self._failed(url, exc))
        if errors:
            raise RemoteError("; ".join(errors))
        return False

    def transfer_store(self, key, filename):
        raise RemoteError("the registry remote is read-only: push images with "
                          "docker/skopeo, not git-annex")

    def remove(self, key):
        raise RemoteError("the registry remote is read-only: it cannot remove "
                          "blobs from a registry")


def main():
    master = Master()
    remote = RegistryBlobRemote(master)
    master.LinkRemote(remote)
    master.Listen()


if __name__ == "__main__":
    main()
