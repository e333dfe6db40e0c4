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
  :class:`AuthenticationError`.  Only a challenge from the registry's own
  origin is answered: a 401 from a host reached by a redirect (a CDN) is an
  error, so credentials go to the registry and the token realm *it* named,
  never to a realm a third host names.
- ``408``, ``429``, ``500``, ``502``, ``503``, ``504`` and lost connections
  are retried with exponential backoff, honouring ``Retry-After`` (seconds or
  an HTTP date); every wait is capped at ``max_wait``.  :class:`Attempts` is
  the one retry budget every read uses (requests here, token forms, manifest
  and blob bodies in :mod:`.client`): at most ``retries`` failures in a row
  and ``give_up_after`` seconds without progress, then one clear error.
- Redirects are followed by hand; ``Authorization`` only ever goes to the
  origin it was meant for (a blob redirected to a CDN or S3 gets none), and a
  form (an OAuth2 refresh token) is never sent on to a redirect target.
- ``404`` and the codes MANIFEST_UNKNOWN, NAME_UNKNOWN, BLOB_UNKNOWN ->
  :class:`NotFoundError`; ``401``/``403`` -> :class:`AuthenticationError`;
  anything else -> :class:`RegistryError` with ``temporary`` set when a retry
  later may help.  Error URLs are redacted (no userinfo, no token values).

Thread-safe: each thread has its own ``requests.Session``; the token cache
is guarded by a lock.
"""
import base64
import email.utils
import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Dict, Optional, Tuple
from urllib.parse import urlencode, urljoin, urlsplit

import requests
import urllib3

from .urls import redact_url  # noqa: F401 (re-export)
from ..errors import AuthenticationError, NotFoundError, RegistryError

lgr = logging.getLogger("datalad.udocker.registry.transport")

RETRY_STATUSES = frozenset((408, 429, 500, 502, 503, 504))
TEMPORARY_STATUSES = RETRY_STATUSES
# a lost or broken connection: worth another try
CONNECTION_ERRORS = (requests.ConnectionError, requests.Timeout,
                     requests.exceptions.ChunkedEncodingError)
NOT_FOUND_CODES = frozenset(("MANIFEST_UNKNOWN", "NAME_UNKNOWN", "BLOB_UNKNOWN"))
REDIRECT_STATUSES = frozenset((301, 302, 303, 307, 308))
MAX_REDIRECTS = 10
USER_AGENT = "datalad-udocker"
CLIENT_ID = "datalad-udocker"
_TOKEN_RE = re.compile(r"^[\x21-\x7e]{1,16384}\Z")    # printable, no space/CR/LF
_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


def _no_auth(request):
    """requests auth hook that keeps ``~/.netrc`` from overriding our header."""
    return request


def origin(url) -> Tuple[str, str, int]:
    """(scheme, host, port) of ``url``, the unit Authorization is bound to."""
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme, 0)
    return parts.scheme.lower(), (parts.hostname or "").lower(), port


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


MAX_JSON_BODY = 1 << 20    # an error or token answer is a few hundred bytes


def _one_line(value, limit):
    """``value`` as text fit for a one-line message (whitespace folded)."""
    return " ".join(str(value).split())[:limit]


def json_body(response, limit=MAX_JSON_BODY):
    """The JSON object in ``response``'s body (at most ``limit`` bytes read),
    or None for anything else: too long, cut short, not JSON, too deep."""
    try:
        raw = b""
        for chunk in response.iter_content(65536):
            raw += chunk
            if len(raw) > limit:
                return None
        body = json.loads(raw)
    except (ValueError, RecursionError, requests.RequestException,
            urllib3.exceptions.HTTPError, OSError):
        return None
    return body if isinstance(body, dict) else None


def error_codes(response):
    """(codes, first message) from a registry's JSON error body."""
    try:
        body = json_body(response)
        errors = body.get("errors") or []
        codes = tuple(_one_line(e.get("code"), 40) for e in errors
                      if e.get("code"))
        message = next((_one_line(e["message"], 200) for e in errors
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


def _netloc(url):
    """host[:port] of ``url``, without userinfo."""
    return urlsplit(url).netloc.rpartition("@")[2]


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


class Attempts:
    """The retry budget of one read: the package's one retry loop.

    A read (a manifest, a token, a whole blob) makes one ``Attempts`` and
    passes it to every try.  After a failed try, :meth:`retry` sleeps (backoff
    doubling from ``transport.backoff``, ``Retry-After`` honoured, each wait
    at most ``transport.max_wait``) or, once ``transport.retries`` failures in
    a row or ``transport.give_up_after`` seconds without progress are used
    up, raises one temporary RegistryError.  :meth:`progressed` (bytes
    arrived) starts both counts again, so a long download that keeps moving
    is never cut short.
    """

    def __init__(self, transport, url, what=None):
        self.transport = transport
        self.url = url
        self.what = what or redact_url(url)
        self.failures = 0
        self.deadline = time.monotonic() + transport.give_up_after

    def can_retry(self, limit=None) -> bool:
        limit = self.transport.retries if limit is None else limit
        return self.failures < limit and time.monotonic() < self.deadline

    def wait(self, reason, retry_after=None) -> None:
        """Sleep before the next try (no check: see :meth:`can_retry`)."""
        wait = min(self.transport.delay(self.failures, retry_after),
                   max(0.0, self.deadline - time.monotonic()))
        self.failures += 1
        lgr.debug("%s: %s; retry %d in %.2fs", self.what, reason,
                  self.failures, wait)
        time.sleep(wait)

    def retry(self, reason, retry_after=None) -> None:
        """Sleep before the next try, or raise when the budget is spent."""
        if not self.can_retry():
            raise RegistryError(
                "giving up on %s after %d failed attempts (last: %s); the "
                "registry or the network keeps failing, try again later"
                % (self.what, self.failures + 1, reason),
                url=redact_url(self.url), temporary=True)
        self.wait(reason, retry_after)

    def progressed(self) -> None:
        self.failures = 0
        self.deadline = time.monotonic() + self.transport.give_up_after


class Transport:
    """Authenticating, retrying HTTP for one registry origin.

    ``base_url`` is ``scheme://host[:port]``; ``credentials`` a
    :class:`~.credentials.Credentials` or None.  ``retries`` is the number of
    retries after the first attempt; waits start at ``backoff`` seconds and
    double, each capped at ``max_wait``; no read keeps retrying longer than
    ``give_up_after`` seconds without progress (see :class:`Attempts`).
    """

    def __init__(self, base_url, credentials=None, retries=5, backoff=0.5,
                 max_wait=30.0, timeout=(15.0, 120.0), give_up_after=300.0):
        self.base_url = base_url.rstrip("/")
        self.origin = origin(self.base_url)
        self.host = urlsplit(self.base_url).netloc
        self.credentials = credentials
        self.retries = retries
        self.backoff = backoff
        self.max_wait = max_wait
        self.timeout = timeout
        self.give_up_after = give_up_after
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

    def attempts(self, url, what=None) -> Attempts:
        """A fresh retry budget for one read of ``url``."""
        return Attempts(self, url, what)

    def _follow(self, method, url, headers, stream, authorization, data=None):
        """One attempt: send, following redirects by hand.

        A request with a form body (``data``) follows no redirect: its body
        may hold a secret meant for ``url`` only.
        """
        auth_origin = origin(url)
        for _ in range(MAX_REDIRECTS + 1):
            hop = dict(headers or {})
            if authorization and origin(url) == auth_origin:
                hop["Authorization"] = authorization
            resp = self.session.request(
                method, url, headers=hop, stream=stream, auth=_no_auth,
                allow_redirects=False, timeout=self.timeout, data=data)
            if data is not None:
                return resp
            location = resp.headers.get("Location")
            if resp.status_code not in REDIRECT_STATUSES or not location:
                return resp
            resp.close()
            url = urljoin(url, location)
            lgr.debug("redirected to %s", redact_url(url))
        raise RegistryError("too many redirects from %s" % redact_url(url),
                            url=redact_url(url))

    def send(self, method, url, headers=None, stream=False,
             authorization=None, data=None, attempts=None
             ) -> requests.Response:
        """Send with retries for rate limits, 5xx answers and lost connections.

        ``attempts`` is the read's retry budget (a fresh one if None).
        Returns the last response whatever its status; raises RegistryError
        (never a ``requests`` exception) when no response could be had.
        """
        attempts = attempts or self.attempts(url)
        host = urlsplit(url).netloc.rpartition("@")[2]
        while True:
            try:
                resp = self._follow(method, url, headers, stream,
                                    authorization, data)
            except requests.exceptions.SSLError as exc:
                raise RegistryError(
                    "TLS error talking to %s (%s); if its certificate is "
                    "signed by a private CA or your network inspects TLS, "
                    "add that CA to the system trust store or point "
                    "REQUESTS_CA_BUNDLE at it" % (host, type(exc).__name__),
                    url=redact_url(url)) from None
            except CONNECTION_ERRORS as exc:
                limit = min(self.retries, 2) if _nobody_there(exc) else None
                if not attempts.can_retry(limit):
                    raise RegistryError(
                        "cannot reach %s after %d attempts (%s); check the "
                        "network and the registry name"
                        % (host, attempts.failures + 1, _connection_reason(exc)),
                        url=redact_url(url), temporary=True) from None
                attempts.wait(_connection_reason(exc))
                continue
            except (requests.RequestException, ValueError) as exc:
                raise RegistryError(
                    "request to %s failed (%s); check the registry name"
                    % (redact_url(url), type(exc).__name__),
                    url=redact_url(url)) from None
            if (resp.status_code not in RETRY_STATUSES
                    or not attempts.can_retry()):
                return resp
            resp.close()
            attempts.wait("HTTP %d" % resp.status_code,
                          resp.headers.get("Retry-After"))

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
                "registry %s sent an unusable token realm %s"
                % (self.host, redact_url(realm)))
        c = self.credentials
        if (c is not None and self.origin[0] == "https"
                and origin(realm)[0] != "https"):
            raise AuthenticationError(
                "registry %s names a plain-http token service %s; refusing "
                "to send credentials unencrypted (ask the registry's "
                "operator to serve its token service over https)"
                % (self.host, redact_url(realm)), url=redact_url(realm))
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
            body = json_body(resp) or {}
            value = body.get("token") or body.get("access_token")
            try:
                expires_in = float(body.get("expires_in") or 60)
            except (ValueError, TypeError, OverflowError):
                expires_in = 60.0
            if not 0 < expires_in < 86400:     # nan, negative, absurd
                expires_in = 60.0 if not expires_in > 0 else 86400.0
        if not isinstance(value, str) or not _TOKEN_RE.match(value):
            raise RegistryError("token service %s returned no token"
                                % redact_url(realm), url=redact_url(realm))
        margin = min(10.0, expires_in / 4)
        lgr.debug("got a token for %s (scope %r, %ds)", self.host, scope,
                  expires_in)
        return _Token(value, time.monotonic() + expires_in - margin)

    def _post_form(self, url, data):
        """OAuth2 refresh-token grant (identity tokens), with retries.

        The form goes to ``url`` only (no redirect is followed) and failures
        are RegistryErrors like every other request's.
        """
        return self.send("POST", url, data=data)

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
                stream=False, attempts=None) -> requests.Response:
        """Send an authenticated request to this registry; raise on failure.

        ``scope`` (e.g. ``repository:library/busybox:pull``) lets a known
        Bearer challenge be answered before the first 401.  ``attempts`` is
        the read's retry budget (see :class:`Attempts`).  Returns a 2xx
        response (the caller closes it when ``stream`` is true).
        """
        if origin(url) != self.origin:
            raise RegistryError(
                "refusing to send %s credentials to %s"
                % (self.host, redact_url(url)), url=redact_url(url))
        authorization = self._authorization(scope)
        for attempt in range(2):
            resp = self.send(method, url, headers, stream, authorization,
                             attempts=attempts)
            if resp.status_code != 401:
                break
            challenge = parse_challenge(resp.headers.get("WWW-Authenticate"))
            resp.close()
            answered_by = origin(resp.url or url)
            if answered_by != self.origin:
                # a CDN (or anyone a redirect led to) asking for credentials:
                # its realm is not ours to trust with them
                raise AuthenticationError(
                    "%s, reached by a redirect from registry %s, asked for "
                    "credentials (HTTP 401); credentials are only sent to "
                    "%s and the token service it names, so none were sent"
                    % (_netloc(resp.url), self.host, self.host),
                    status=401, url=redact_url(resp.url))
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
