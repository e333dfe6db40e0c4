"""Talking to OCI distribution registries.

- :mod:`.credentials` -- find credentials where ``docker login``/podman put them
- :mod:`.transport`   -- HTTP with auth challenges, per-scope tokens, retries,
  redirect-safe Authorization and redacted errors
- :mod:`.client`      -- resolve references, read manifests and configs, stream
  verified, resumable blobs
- :mod:`.urls`        -- blob URLs and redaction, without an HTTP stack

Names are imported on first use, so that importing :mod:`.urls` alone (the
special remote claiming URLs) does not load ``requests``.
"""
import importlib

_WHERE = {"RegistryClient": "client", "ResolvedImage": "client",
          "parse_blob_url": "urls", "Credentials": "credentials",
          "lookup": "credentials"}


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module("." + _WHERE[name], __name__), name)
    raise AttributeError(name)


__all__ = ["RegistryClient", "ResolvedImage", "parse_blob_url",
           "Credentials", "lookup"]
