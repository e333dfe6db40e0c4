"""HTTP to a registry: authentication challenges, token cache, retries, redirects.

One :class:`Transport` talks to one registry (scheme + host + port, its
*origin*).  :meth:`Transport.request` returns a successful
``requests.Response`` or raises one of the package's errors:

- ``401`` with ``WWW-Authenticate: Bearer realm=..,service=..,scope=..``:
  a token is fetched from the realm (anonymously, with Basic credentials, or
  with an identity token through the OAuth2 refresh-token grant), cached per
  (realm, service, scope) until shortly before ``expires_in`` (default 60 s)
  runs out, and the request is sent again.  ``Basic`` challenges are answered
  with the credentials.  A second 401 means wrong credentials:
  :class:`AuthenticationError`.
- ``429``, ``502``, ``503``, ``504`` and connection failures are retried with
  exponential backoff, honouring ``Retry-After`` (seconds or an HTTP date);
  every wait is capped at ``max_wait``.
- Redirects are followed by hand; ``Authorization`` only ever goes to the
  origin it was meant for (a blob redirected to a CDN or S3 gets none).
- ``404`` and the codes MANIFEST_UNKNOWN, NAME_UNKNOWN, BLOB_UNKNOWN ->
  :class:`NotFoundError`; ``401``/``403`` -> :class:`AuthenticationError`;
  anything else -> :class:`RegistryError` with ``temporary`` set when a retry
  later may help.  Error URLs are redacted (no userinfo, no token values).

Thread-safe: each thread has its own ``requests.Session``; the token cache
is guarded by a lock.
"""
import base64
import email.utils
import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Dict, Optional, Tuple
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

import requests

from ..errors import AuthenticationError, NotFoundError, RegistryError

lgr = logging.getLogger("datalad.udocker.registry.transport")

RETRY_STATUSES = frozenset((429, 502, 503, 504))
TEMPORARY_STATUSES = RETRY_STATUSES | {408, 500}
NOT_FOUND_CODES = frozenset(("MANIFEST_UNKNOWN", "NAME_UNKNOWN", "BLOB_UNKNOWN"))
REDIRECT_STATUSES = frozenset((301, 302, 303, 307, 308))
MAX_REDIRECTS = 10
USER_AGENT = "datalad-udocker"
CLIENT_ID = "datalad-udocker"
_SENSITIVE_PARAM = re.compile(
    r"token|sig|credential|key|auth|password|secret|policy", re.I)
_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


def _no_auth(request):
    """requests auth hook that keeps ``~/.netrc`` from overriding our header."""
    return request


def origin(url) -> Tuple[str, str, int]:
    """(scheme, host, port) of ``url``, the unit Authorization is bound to."""
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme, 0)
    return parts.scheme.lower(), (parts.hostname or "").lower(), port


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


def parse_challenge(header) -> Optional[Tuple[str, Dict[str, str]]]:
    """(``bearer``|``basic``, params) of a WWW-Authenticate header, or None."""
    if not header:
        return None
    scheme, _, rest = header.strip().partition(" ")
    scheme = scheme.lower()
    if scheme not in ("bearer", "basic"):
        return None
    params = {}
    for m in _CHALLENGE_PARAM.finditer(rest):
        value = m.group(2) if m.group(2) is not None else m.group(3)
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
    return scheme, params


def retry_after_seconds(value, now=None) -> Optional[float]:
    """Seconds to wait from a Retry-After header (delta or HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def error_codes(response):
    """(codes, first message) from a registry's JSON error body."""
    try:
        body = response.json()
        errors = body.get("errors") or []
        codes = tuple(str(e.get("code")) for e in errors if e.get("code"))
        message = next((str(e["message"]) for e in errors
                        if e.get("message")), "")
        return codes, message
    except (ValueError, AttributeError, TypeError):
        return (), ""


# errno values and resolver failures that say "nobody is there": a registry
# that is down or a host name that does not resolve; worth a short retry for
# a restarting service, not a long back-off.
_NOBODY_THERE = re.compile(r"\[Errno (111|-2|-3|-5)\]|Connection refused|"
                           r"Name or service not known|"
                           r"Temporary failure in name resolution")


def _nobody_there(exc):
    return bool(_NOBODY_THERE.search(str(exc)))


def _connection_reason(exc):
    """A short, URL-free reason for a connection failure."""
    m = re.search(r"\[Errno [^\]]+\][^'\")]*", str(exc))
    if m:
        return m.group(0).strip()
    return type(exc).__name__


@dataclass
class _Token:
    value: str
    expires_at: float


class Transport:
    """Authenticating, retrying HTTP for one registry origin.

    ``base_url`` is ``scheme://host[:port]``; ``credentials`` a
    :class:`~.credentials.Credentials` or None.  ``retries`` is the number of
    retries after the first attempt; waits start at ``backoff`` seconds and
    double, each capped at ``max_wait``.
    """

    def __init__(self, base_url, credentials=None, retries=5, backoff=0.5,
                 max_wait=30.0, timeout=(15.0, 120.0)):
        self.base_url = base_url.rstrip("/")
        self.origin = origin(self.base_url)
        self.host = urlsplit(self.base_url).netloc
        self.credentials = credentials
        self.retries = retries
        self.backoff = backoff
        self.max_wait = max_wait
        self.timeout = timeout
        self._local = threading.local()
        self._lock = threading.RLock()
        self._challenge = None          # (scheme, params) last seen
        self._tokens: Dict[Tuple[str, str, str], _Token] = {}
        self.token_requests = 0         # how many tokens were fetched

    # -- sessions and low-level sending ---------------------------------
    @property
    def session(self) -> requests.Session:
        """This thread's session (requests.Session is not thread-safe)."""
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = requests.Session()
            s.headers["User-Agent"] = USER_AGENT
        return s

    def delay(self, attempt, retry_after=None) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based)."""
        wait = retry_after_seconds(retry_after)
        if wait is None:
            wait = self.backoff * (2 ** attempt)
        return min(wait, self.max_wait)

    def _follow(self, method, url, headers, stream, authorization):
        """One attempt: send, following redirects by hand."""
        auth_origin = origin(url)
        for _ in range(MAX_REDIRECTS + 1):
            hop = dict(headers or {})
            if authorization and origin(url) == auth_origin:
                hop["Authorization"] = authorization
            resp = self.session.request(
                method, url, headers=hop, stream=stream, auth=_no_auth,
                allow_redirects=False, timeout=self.timeout)
            location = resp.headers.get("Location")
            if resp.status_code not in REDIRECT_STATUSES or not location:
                return resp
            resp.close()
            url = urljoin(url, location)
            lgr.debug("redirected to %s", redact_url(url))
        raise RegistryError("too many redirects from %s" % redact_url(url),
                            url=redact_url(url))

    def send(self, method, url, headers=None, stream=False,
             authorization=None) -> requests.Response:
        """Send with retries for rate limits, 5xx gateways and lost connections.

        Returns the last response whatever its status; raises RegistryError
        only when no response could be had.
        """
        attempt = 0
        while True:
            try:
                resp = self._follow(method, url, headers, stream, authorization)
            except requests.exceptions.SSLError as exc:
                raise RegistryError(
                    "TLS error talking to %s (%s); if this registry serves "
                    "plain http, add it to datalad.udocker.insecure-registries"
                    % (urlsplit(url).netloc.rpartition("@")[2],
                       type(exc).__name__), url=redact_url(url))
            except (requests.ConnectionError, requests.Timeout) as exc:
                limit = min(self.retries, 2) if _nobody_there(exc) else self.retries
                if attempt >= limit:
                    raise RegistryError(
                        "cannot reach %s after %d attempts (%s); check the "
                        "network and the registry name"
                        % (urlsplit(url).netloc.rpartition("@")[2],
                           attempt + 1, _connection_reason(exc)),
                        url=redact_url(url), temporary=True)
                wait = self.delay(attempt)
                lgr.debug("connection to %s failed (%s), retrying in %.2fs",
                          redact_url(url), _connection_reason(exc), wait)
            else:
                if (resp.status_code not in RETRY_STATUSES
                        or attempt >= self.retries):
                    return resp
                wait = self.delay(attempt, resp.headers.get("Retry-After"))
                lgr.debug("%s answered %d, retrying in %.2fs",
                          redact_url(url), resp.status_code, wait)
                resp.close()
            attempt += 1
            time.sleep(wait)

    # -- authentication -------------------------------------------------
    def _basic(self):
        c = self.credentials
        raw = ("%s:%s" % (c.username, c.password)).encode("utf-8")
        return "Basic " + base64.b64encode(raw).decode("ascii")

    def _authorization(self, scope, rejected=None):
        """The Authorization header to send for ``scope``, or None.

        A cached token equal to ``rejected`` (refused by the registry) is
        replaced; so is one about to expire.
        """
        with self._lock:
            if self._challenge is None:
                return None
            scheme, params = self._challenge
            if scheme == "basic":
                return self._basic() if self.credentials else None
            scope = scope or params.get("scope", "")
            key = (params.get("realm", ""), params.get("service", ""), scope)
            token = self._tokens.get(key)
            if (token is None or time.monotonic() >= token.expires_at
                    or "Bearer " + token.value == rejected):
                token = self._tokens[key] = self._fetch_token(*key)
            return "Bearer " + token.value

    def _fetch_token(self, realm, service, scope) -> _Token:
        """Ask the realm for a token (caller holds the lock)."""
        if not realm.startswith(("http://", "https://")):
            raise AuthenticationError(
                "registry %s sent an unusable token realm %r"
                % (self.host, realm))
        c = self.credentials
        params = [(k, v) for k, v in (("service", service), ("scope", scope))
                  if v]
        if c is not None and c.identity_token:
            data = params + [("grant_type", "refresh_token"),
                             ("refresh_token", c.password),
                             ("client_id", CLIENT_ID)]
            resp = self._post_form(realm, data)
        else:
            url = realm + ("&" if "?" in realm else "?") + urlencode(params)
            resp = self.send("GET", url,
                             authorization=self._basic() if c else None)
        self.token_requests += 1
        with resp:
            if resp.status_code in (401, 403):
                raise self._auth_error(resp.status_code, realm)
            if resp.status_code != 200:
                raise self.error(resp, realm)
            try:
                body = resp.json()
                value = body.get("token") or body.get("access_token")
                expires_in = float(body.get("expires_in") or 60)
            except (ValueError, AttributeError, TypeError):
                value, expires_in = None, 0
        if not value:
            raise RegistryError("token service %s returned no token"
                                % redact_url(realm), url=redact_url(realm))
        margin = min(10.0, expires_in / 4)
        lgr.debug("got a token for %s (scope %r, %ds)", self.host, scope,
                  expires_in)
        return _Token(value, time.monotonic() + expires_in - margin)

    def _post_form(self, url, data):
        """OAuth2 refresh-token grant (identity tokens), with retries."""
        attempt = 0
        while True:
            try:
                resp = self.session.post(url, data=data, auth=_no_auth,
                                         timeout=self.timeout,
                                         allow_redirects=False)
            except (requests.ConnectionError, requests.Timeout):
                if attempt >= self.retries:
                    raise
            else:
                if (resp.status_code not in RETRY_STATUSES
                        or attempt >= self.retries):
                    return resp
                resp.close()
            time.sleep(self.delay(attempt))
            attempt += 1

    def _auth_error(self, status, url):
        if self.credentials is None:
            what = ("registry %s requires authentication (HTTP %d); log in "
                    "with `docker login %s` (credentials are read from "
                    "~/.docker/config.json)" % (self.host, status, self.host))
        elif status == 403:
            what = ("registry %s denied access (HTTP 403) for user %s; check "
                    "the image name and the account's rights (`docker login "
                    "%s`, ~/.docker/config.json)"
                    % (self.host, self.credentials.username, self.host))
        else:
            what = ("registry %s refused the credentials of user %s (HTTP "
                    "%d); check `docker login %s` or ~/.docker/config.json"
                    % (self.host, self.credentials.username, status,
                       self.host))
        return AuthenticationError(what, status=status, url=redact_url(url))

    # -- the public entry point -----------------------------------------
    def request(self, method, url, headers=None, scope=None,
                stream=False) -> requests.Response:
        """Send an authenticated request to this registry; raise on failure.

        ``scope`` (e.g. ``repository:library/busybox:pull``) lets a known
        Bearer challenge be answered before the first 401.  Returns a 2xx
        response (the caller closes it when ``stream`` is true).
        """
        if origin(url) != self.origin:
            raise RegistryError(
                "refusing to send %s credentials to %s"
                % (self.host, redact_url(url)), url=redact_url(url))
        authorization = self._authorization(scope)
        for attempt in range(2):
            resp = self.send(method, url, headers, stream, authorization)
            if resp.status_code != 401:
                break
            challenge = parse_challenge(resp.headers.get("WWW-Authenticate"))
            resp.close()
            if attempt == 1 or challenge is None or (
                    challenge[0] == "basic" and (
                        self.credentials is None or authorization)):
                raise self._auth_error(401, url)
            with self._lock:
                self._challenge = challenge
                wanted = challenge[1].get("scope") or scope
                authorization = self._authorization(wanted, authorization)
                if challenge[0] == "bearer" and scope and scope != wanted:
                    key = (challenge[1].get("realm", ""),
                           challenge[1].get("service", ""))
                    self._tokens[key + (scope,)] = self._tokens[key + (wanted,)]
        if resp.status_code >= 300:
            raise self.error(resp, url)
        return resp

    def error(self, resp, url) -> RegistryError:
        """The package error for an unsuccessful response (closes it)."""
        status = resp.status_code
        codes, message = error_codes(resp) if method_has_body(resp) else ((), "")
        resp.close()
        shown = redact_url(url)
        detail = " (%s)" % ", ".join(codes) if codes else ""
        if status == 404 or NOT_FOUND_CODES.intersection(codes):
            return NotFoundError(
                "not found: %s%s; check the image name and tag"
                % (shown, detail), status=status, codes=codes, url=shown)
        if status in (401, 403):
            err = self._auth_error(status, url)
            err.codes = codes
            return err
        text = ": %s" % message[:200] if message else ""
        return RegistryError(
            "registry %s answered HTTP %d%s%s for %s"
            % (self.host, status, detail, text, shown), status=status,
            codes=codes, url=shown, temporary=status in TEMPORARY_STATUSES)


def method_has_body(resp):
    """HEAD responses carry no body to parse."""
    return resp.request is None or resp.request.method != "HEAD"
