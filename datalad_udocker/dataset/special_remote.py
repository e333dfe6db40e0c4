"""git-annex-remote-udocker: a read-only special remote for registry blobs.

Layers imported by ``datalad udocker-import`` have their registry blob URL
(``http[s]://HOST/v2/REPOSITORY/blobs/sha256:HEX``) registered in git-annex.
This remote claims such URLs and fetches them through the registry client
(token/Basic auth from ``~/.docker/config.json`` or containers' auth.json,
redirects without credentials, retries, Range resume, digest check).
It is initialised with ``autoenable=true``, so ``datalad clone`` enables it
and ``datalad get`` just works.  It cannot store or remove anything.

Set up by hand (the import command does this for you)::

    git annex initremote udocker-registry type=external externaltype=udocker \
        encryption=none autoenable=true
"""
import logging
import os

from annexremote import Master, RemoteError, SpecialRemote

from .. import config
from .annex import trust_remote_verification
from ..digest import digest_from_key
from ..errors import NotFoundError, UdockerError
from ..registry.client import RegistryClient, parse_blob_url

lgr = logging.getLogger("datalad.udocker.special_remote")


def is_blob_url(url):
    try:
        parse_blob_url(url)
        return True
    except (ValueError, UdockerError):
        return False


def _client_for(url):
    """A client for the URL's registry.  Plain http only where the user's
    settings allow it (loopback, datalad.udocker.insecure-registries): an
    ``http://`` URL in a cloned dataset must not downgrade a remote registry."""
    from datalad.distribution.dataset import Dataset
    insecure = config.insecure_registries(Dataset(os.getcwd()))
    return RegistryClient.for_url(url, insecure_registries=insecure)


class RegistryBlobRemote(SpecialRemote):
    """Protocol in, registry client out; each method a few lines."""

    def initremote(self):
        # this remote checks every byte against the key's digest: git-annex
        # need not hash it again (also run when a clone autoenables it)
        trust_remote_verification(self.annex.getgitdir(),
                                  self.annex.getconfig("name"))

    def prepare(self):
        pass

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
        errors = []
        for url in urls:
            try:
                _client_for(url).download_blob(url, digest, size, filename, progress)
                return
            except UdockerError as exc:
                errors.append(str(exc))
        raise RemoteError("; ".join(errors))

    def checkpresent(self, key):
        errors = []
        for url in self._urls(key):
            try:
                if _client_for(url).blob_exists(url):
                    return True
            except NotFoundError:
                continue
            except UdockerError as exc:
                errors.append(str(exc))
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
