"""Talking to OCI distribution registries.

- :mod:`.credentials` -- find credentials where ``docker login``/podman put them
- :mod:`.transport`   -- HTTP with auth challenges, per-scope tokens, retries,
  redirect-safe Authorization and redacted errors
- :mod:`.client`      -- resolve references, read manifests and configs, stream
  verified, resumable blobs
"""
from .client import RegistryClient, ResolvedImage, parse_blob_url
from .credentials import Credentials, lookup

__all__ = ["RegistryClient", "ResolvedImage", "parse_blob_url",
           "Credentials", "lookup"]
