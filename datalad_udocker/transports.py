"""Every kind of image source, in one table.

An image source is named as skopeo names it: ``TRANSPORT:REST``, where a
plain reference (``busybox``, ``127.0.0.1:5000/repo:tag``) is the registry
transport ``docker://`` without its prefix.  :func:`open_image` parses the
name once and opens it with the transport's opener.
"""
REGISTRY = "docker"
# transport -> (module, opener name); imported when used, since the openers
# live in the subsystems (registry/, archive/) that themselves use this table
TRANSPORTS = {
    REGISTRY: ("registry.source", "open_registry_source"),
    "docker-archive": ("archive.source", "open_source"),
    "oci-archive": ("archive.source", "open_source"),
    "oci": ("archive.source", "open_source"),
}
LOCAL_TRANSPORTS = tuple(t for t in TRANSPORTS if t != REGISTRY)


def split_transport(spec):
    """``(transport, rest)`` of a source name (a plain reference: the
    registry transport)."""
    if spec.startswith(REGISTRY + "://"):
        return REGISTRY, spec[len(REGISTRY) + 3:]
    transport, sep, rest = spec.partition(":")
    if sep and transport in LOCAL_TRANSPORTS:
        return transport, rest
    return REGISTRY, spec


def open_image(spec, client_factory, platform=None, source_ref=None):
    """The ``source.ImageSource`` named by ``spec``, from any transport.

    ``client_factory(Reference) -> RegistryClient`` reaches registries (the
    image's own, or the one a local image is matched with); ``platform`` (an
    oci.Platform or None: the host's) picks from a multi-platform image;
    ``source_ref`` names the registry image a local one was pulled from.
    Raises a UdockerError subclass with a one-line message.
    """
    import importlib
    transport, rest = split_transport(spec)
    module, name = TRANSPORTS[transport]
    opener = getattr(importlib.import_module("." + module, __package__), name)
    return opener(spec if transport != REGISTRY else rest, source_ref,
                  client_factory, platform=platform)
