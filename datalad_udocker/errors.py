"""One exception hierarchy for the whole package.

Every error carries a one-line message that says what went wrong and what to
do.  Commands turn them into DataLad result records (``status='error'`` or
``'impossible'``); nothing below the command layer prints.
"""


class UdockerError(Exception):
    """Base class: ``str(err)`` is a one-line message fit for a user."""


class InvalidReference(UdockerError):
    """An image reference that cannot be parsed."""


class RegistryError(UdockerError):
    """An HTTP exchange with a registry failed.

    ``status`` is the HTTP status (or None for a connection failure),
    ``codes`` the registry's error codes, ``url`` a URL without credentials
    and ``temporary`` whether retrying may help.
    """

    def __init__(self, message, status=None, codes=(), url=None,
                 temporary=False):
        super().__init__(message)
        self.status = status
        self.codes = tuple(codes)
        self.url = url
        self.temporary = temporary


class AuthenticationError(RegistryError):
    """The registry refused our credentials (or wants some we do not have)."""


class NotFoundError(RegistryError):
    """Repository, tag, manifest or blob unknown to the registry."""


class DigestMismatch(UdockerError):
    """Bytes that do not hash to the digest they were asked for."""


class PlatformNotFound(UdockerError):
    """An image index holds no manifest for the requested platform."""


class UnsupportedMediaType(UdockerError):
    """A manifest or layer media type this package cannot store or run."""


class LayoutError(UdockerError):
    """An OCI image layout on disk is missing or inconsistent."""


class ArchiveError(UdockerError):
    """A docker-archive / OCI archive is corrupt, unsafe or ambiguous."""


class RunError(UdockerError):
    """Running an image failed before the command itself ran."""


RuntimeError_ = RunError     # the old name, still accepted


class ToolMissing(RunError):
    """An execution tool (proot, runc, ...) is not installed."""


class CommandNotFound(RunError):
    """The command (or entrypoint) does not exist in the container."""
    exit_code = 127


class MalformedImage(UnsupportedMediaType):
    """A manifest, index, config or descriptor that is not well formed.

    A subclass of UnsupportedMediaType, which such input used to raise, so
    that callers catching that keep working.
    """


class InvalidDigest(MalformedImage):
    """A digest that is not ``sha256:`` and 64 lowercase hex digits, or a
    size that is not a sane non-negative integer."""


class UnsafeLayer(UdockerError):
    """An image layer that would write outside its container when extracted."""
