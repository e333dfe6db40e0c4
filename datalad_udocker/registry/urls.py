"""Registry URLs as plain strings: no HTTP here, so that the special remote
can claim URLs without loading an HTTP stack."""
import re
from typing import Tuple
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..errors import UdockerError

_SENSITIVE_PARAM = re.compile(
    r"token|sig|credential|key|auth|password|secret|policy", re.I)
_BLOB_URL_RE = re.compile(
    r"^(https?://[^/?#]+)/v2/((?:[^/?#]+/)*[^/?#]+)/blobs/(sha256:[0-9a-f]{64})$")


def redact_url(url) -> str:
    """``url`` without userinfo and with secret-looking query values hidden."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    netloc = parts.netloc.rpartition("@")[2]
    query = parts.query
    if query:
        query = urlencode(
            [(k, "REDACTED" if _SENSITIVE_PARAM.search(k) else v)
             for k, v in parse_qsl(query, keep_blank_values=True)],
            safe="/:")
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def parse_blob_url(url) -> Tuple[str, str, str]:
    """(base_url, repository, digest) of a registry blob URL.

    ``http://127.0.0.1:5000/v2/test/x/blobs/sha256:ab..`` ->
    ``("http://127.0.0.1:5000", "test/x", "sha256:ab..")``.
    """
    m = _BLOB_URL_RE.match(url or "") if isinstance(url, str) else None
    if not m:
        raise UdockerError("not a registry blob URL: %s" % redact_url(url))
    return m.group(1), m.group(2), m.group(3)
