"""Where credentials go, what a hostile manifest can make us fetch, and reads that survive faults.

All through real parts: the real registries (plain, Basic, token), the real fault proxy in front
of them (500s, drops mid-body, redirects to a "CDN" that answers with its own challenge) and a
:class:`LoggingServer` standing in for a foreign token realm, which records every header and body
it receives so that a leaked password, Basic header or Bearer token cannot go unnoticed.
"""
import base64
import http.server
import json
import ssl
import subprocess
import threading
import time

import pytest
from cryptography.hazmat.primitives import serialization

from datalad_udocker import oci
from datalad_udocker.digest import sha256_digest
from datalad_udocker.errors import (AuthenticationError, InvalidDigest, MalformedImage,
                                    RegistryError)
from datalad_udocker.reference import parse_reference
from datalad_udocker.registry import RegistryClient
from datalad_udocker.registry.credentials import Credentials
from datalad_udocker.registry.transport import Transport
from fixtures.proxy import FaultProxy, LoggingServer
from fixtures.tokens import make_signing_cert
from fixtures.util import free_port

from checks import assert_valid_layout, dataset_state, imp

pytestmark = pytest.mark.timeout(120)

FAST = dict(backoff=0.01, max_wait=2.0)


def client_for(host, **kw):
    return RegistryClient(host, **{**FAST, **kw})


def ref(host, name):
    return parse_reference("%s/%s" % (host, name))


def secret_forms(user, password, tokens=()):
    """Every form a credential can travel in: the password, user:password in base64, tokens."""
    basic = base64.b64encode(f"{user}:{password}".encode()).decode()
    return [password, basic, *tokens]


def assert_never_sent(texts, forms):
    for text in texts:
        for form in forms:
            assert form not in text, f"a credential reached the wrong host: {text[:300]!r}"


def proxy_texts(proxy, server):
    return ["\n".join([r.method, r.path] + [f"{k}: {v}" for k, v in r.headers.items()])
            for r in proxy.seen(server=server)]


# -- credentials go only to the registry and the realm it named ---------------------------------
def test_cdn_challenge_gets_no_basic_credentials(basic_registry):
    """A CDN reached by redirect answers 401 naming its own token realm: nothing is sent there."""
    user, password = basic_registry.username, basic_registry.password
    basic = "Basic " + base64.b64encode(basic_registry.creds.encode()).decode()
    with LoggingServer() as realm, \
            FaultProxy(basic_registry.host, cdn_upstream_headers={"Authorization": basic}) as proxy:
        proxy.redirect_blobs()
        proxy.challenge(f'Bearer realm="{realm.url}/token",service="cdn",'
                        f'scope="repository:test/multi:pull"')
        c = client_for(proxy.host, credentials=Credentials(user, password))
        with pytest.raises(AuthenticationError) as exc:
            c.resolve(ref(proxy.host, "test/multi:1"))
        msg = str(exc.value)
        assert proxy.cdn_host in msg and "none were sent" in msg and "\n" not in msg
        assert password not in msg
        assert realm.requests == [], [r.text() for r in realm.requests]
        cdn = proxy.seen(server="cdn")
        assert cdn and all(r.status == 401 for r in cdn)
        assert_never_sent(proxy_texts(proxy, "cdn"), secret_forms(user, password))
        # the registry itself did get the credentials: the test is not vacuous
        assert any(r.headers.get("authorization") == basic for r in proxy.seen(server="proxy"))


def test_cdn_challenge_gets_no_token_or_password(token_registry, token_issuer):
    """Same with a token registry: neither the password nor the registry's Bearer token leak."""
    token_issuer.anonymous_pull = False
    user, password = token_registry.username, token_registry.password
    with LoggingServer() as realm, FaultProxy(token_registry.host) as proxy:
        proxy.redirect_blobs()
        proxy.challenge(f'Bearer realm="{realm.url}/token",service="cdn"')
        c = client_for(proxy.host, credentials=Credentials(user, password))
        with pytest.raises(AuthenticationError, match="none were sent"):
            c.resolve(ref(proxy.host, "test/multi:1"))
        tokens = [t.value for t in c.transport._tokens.values()]
        assert tokens, "the registry's own challenge was answered with a token"
        assert [r.account for r in token_issuer.requests] == [user]
        assert realm.requests == [], [r.text() for r in realm.requests]
        assert_never_sent(proxy_texts(proxy, "cdn"), secret_forms(user, password, tokens))


def test_refresh_token_form_follows_no_redirect():
    """The OAuth2 form (an identity token) goes to the realm only, never to a redirect target."""
    with LoggingServer() as elsewhere, LoggingServer(status=307) as realm:
        realm.headers["Location"] = elsewhere.url + "/steal"
        t = Transport("http://127.0.0.1:1", Credentials("<token>", "refresh-secret-value",
                                                        identity_token=True), **FAST)
        with pytest.raises(RegistryError) as exc:
            t._fetch_token(realm.url + "/token", "svc", "repository:x:pull")
        assert "refresh-secret-value" not in str(exc.value)
        assert len(realm.requests) == 1 and b"refresh-secret-value" in realm.requests[0].body
        assert elsewhere.requests == []


def test_token_realm_unreachable_is_a_registry_error():
    """_post_form lets no raw requests exception escape."""
    port = free_port()
    t = Transport("http://127.0.0.1:1", Credentials("<token>", "rt", identity_token=True),
                  retries=1, **FAST)
    with pytest.raises(RegistryError, match="cannot reach 127.0.0.1:%d" % port) as exc:
        t._fetch_token("http://127.0.0.1:%d/token" % port, "svc", "")
    assert exc.value.temporary and "\n" not in str(exc.value)


def test_https_registry_sends_no_credentials_to_plain_http_realm():
    with LoggingServer() as realm:
        t = Transport("https://registry.example", Credentials("u", "pw-for-https-only"), **FAST)
        with pytest.raises(AuthenticationError, match="unencrypted"):
            t._fetch_token(realm.url + "/token", "svc", "repository:x:pull")
        assert realm.requests == []


@pytest.mark.parametrize("typed", [
    "{user}:{pw}@{host}/test/single:1",
    "docker://{user}:{pw}@{host}/test/single:1",
    "{user}:{pw}@{host}/test/single@sha256:" + "ab" * 32,
    "{user}:p/{pw}@{host}/test/single:1",
])
def test_reference_with_password_is_refused_without_echo(ds, registry, typed):
    pw = "Sekr1t-in-ref-XYZ"
    text = typed.format(user="alice", pw=pw, host=registry.host)
    before = dataset_state(ds.path)
    res = imp(ds, text)
    assert res["status"] == "impossible"
    assert "docker login" in res["message"] and "credentials" in res["message"]
    assert "\n" not in res["message"]
    assert pw not in repr(res)
    assert dataset_state(ds.path) == before


def test_reference_with_password_cli_output_has_no_password(ds, registry):
    pw = "Sekr1t-on-cli-XYZ"
    proc = subprocess.run(["datalad", "udocker-import", f"bob:{pw}@{registry.host}/test/x:1"],
                          cwd=ds.path, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "docker login" in proc.stdout + proc.stderr
    assert pw not in proc.stdout + proc.stderr


def test_tls_error_hint_says_fix_the_ca(tmp_path):
    """A certificate we do not trust (interception, private CA): the advice is to fix trust."""
    key, cert = make_signing_cert("127.0.0.1")
    pem = tmp_path / "tls.pem"
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.TraditionalOpenSSL,
                                      serialization.NoEncryption())
                    + cert.public_bytes(serialization.Encoding.PEM))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pem))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                     daemon=True).start()
    try:
        t = Transport("https://127.0.0.1:%d" % server.server_address[1], **FAST)
        with pytest.raises(RegistryError) as exc:
            t.send("GET", t.base_url + "/v2/")
        msg = str(exc.value)
        assert "REQUESTS_CA_BUNDLE" in msg and "trust" in msg
        assert "insecure-registries" not in msg and "\n" not in msg
    finally:
        server.shutdown()
        server.server_close()


# -- digests are validated before any use ------------------------------------------------------
def _manifest(config_digest, config_size=2, layers=()):
    return json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
                       "config": {"mediaType": oci.OCI_CONFIG, "digest": config_digest,
                                  "size": config_size},
                       "layers": list(layers)}).encode()


GOOD = "sha256:" + "ab" * 32


@pytest.mark.parametrize("raw, words", [
    (_manifest("sha256:../../x?y="), "not a valid digest"),
    (_manifest("sha256:../../../v2/_catalog#" + "a" * 40), "not a valid digest"),
    (_manifest("sha256:" + "AB" * 32), "not a valid digest"),
    (_manifest("sha512:" + "ab" * 64), "only sha256 is supported"),
    (_manifest(GOOD, -1), "not a valid size"),
    (_manifest(GOOD, True), "not a valid size"),
    (_manifest(GOOD, "2"), "not a valid size"),
    (_manifest(GOOD, 2.0), "not a valid size"),
    (_manifest(GOOD, 1 << 62), "not a valid size"),
    (_manifest(GOOD, layers=[{"mediaType": "x", "digest": "sha256:../../../etc", "size": 1}]),
     "layer 0 digest"),
    (json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": [
        {"mediaType": oci.OCI_MANIFEST, "digest": "sha256:../manifests/latest", "size": 2,
         "platform": {"os": "linux", "architecture": "amd64"}}]}).encode(), "index entry 0"),
])
def test_hostile_digest_is_never_requested(basic_registry, raw, words):
    """A registry (here the proxy) serves a manifest with a hostile digest: no URL is built."""
    with FaultProxy(basic_registry.host) as proxy:
        proxy.serve(raw, r"/manifests/evil$")
        c = client_for(proxy.host, credentials=Credentials(basic_registry.username,
                                                           basic_registry.password))
        with pytest.raises(InvalidDigest, match=words) as exc:
            c.resolve(ref(proxy.host, "test/single:evil"))
        assert "\n" not in str(exc.value)
        paths = [r.path for r in proxy.seen()]
        assert paths and all(p.endswith("/manifests/evil") for p in paths), paths


def test_config_without_rootfs_is_a_clean_error(fault_proxy):
    config = json.dumps({"os": "linux", "architecture": "amd64"}).encode()
    digest = sha256_digest(config)
    fault_proxy.serve(_manifest(digest, len(config)), r"/manifests/norootfs$")
    fault_proxy.serve(config, "/blobs/" + digest, "application/octet-stream")
    with pytest.raises(MalformedImage, match="no rootfs"):
        client_for(fault_proxy.host).resolve(ref(fault_proxy.host, "test/single:norootfs"))


# -- every read survives faults -----------------------------------------------------------------
def test_500_is_retried_for_manifest_and_config(fault_proxy, registry):
    pushed = registry.images["test/single:1"]
    fault_proxy.fail_with_status(500, times=2, path=r"/manifests/")
    fault_proxy.fail_with_status(500, times=2, path=pushed.config.digest)
    img = client_for(fault_proxy.host).resolve(ref(fault_proxy.host, "test/single:1"))
    assert img.manifest.digest == pushed.manifest_digest
    assert [r.status for r in fault_proxy.seen(path="/manifests/")] == [500, 500, 200]
    assert [r.status for r in fault_proxy.seen(path=pushed.config.digest)] == [500, 500, 200]


def test_manifest_dropped_mid_body_is_fetched_again(fault_proxy, registry):
    pushed = registry.images["test/single:1"]
    fault_proxy.drop_after(100, times=2, path=r"/manifests/")
    m = client_for(fault_proxy.host).get_manifest("test/single", "1")
    assert m.digest == pushed.manifest_digest
    assert [r.fault for r in fault_proxy.seen(path="/manifests/")] == ["drop", "drop", None]


def test_config_dropped_mid_body_resumes_with_range(fault_proxy, registry):
    pushed = registry.images["test/single:1"]
    assert pushed.config.size > 60
    fault_proxy.drop_after(60, times=1, path=pushed.config.digest)
    img = client_for(fault_proxy.host).resolve(ref(fault_proxy.host, "test/single:1"))
    assert sha256_digest(img.config_raw) == pushed.config.digest
    gets = fault_proxy.seen(path=pushed.config.digest)
    assert [(g.fault, g.headers.get("range")) for g in gets] == [("drop", None),
                                                                  (None, "bytes=60-")]


def test_giving_up_is_bounded_in_time(fault_proxy):
    fault_proxy.drop_after(10, times=None, path=r"/manifests/")
    c = client_for(fault_proxy.host, retries=10_000, give_up_after=2.0)
    start = time.monotonic()
    with pytest.raises(RegistryError) as exc:
        c.get_manifest("test/single", "1")
    assert time.monotonic() - start < 15
    msg = str(exc.value)
    assert exc.value.temporary and "giving up" in msg and "try again later" in msg
    assert "\n" not in msg


def test_import_survives_500s_and_drops_of_manifest_and_config(ds, registry, fault_proxy):
    pushed = registry.images["test/multi:1"]
    fault_proxy.fail_with_status(500, times=1, path=r"/manifests/")
    fault_proxy.drop_after(100, times=1, path=r"/manifests/")
    fault_proxy.fail_with_status(500, times=1, path=pushed.config.digest)
    fault_proxy.drop_after(50, times=1, path=pushed.config.digest)
    fault_proxy.fail_with_status(500, times=1, path=pushed.layers[0].digest)
    res = imp(ds, f"{fault_proxy.host}/{pushed.name}:{pushed.tag}")
    assert res["status"] == "ok", res
    assert_valid_layout(ds.path, res["path"])
    assert all(f.fired == f.times for f in fault_proxy.faults)



@pytest.mark.parametrize("status, body, words", [
    (200, json.dumps({"token": "abc\r\nX-Injected: 1"}).encode(), "returned no token"),
    (200, json.dumps({"token": 12345}).encode(), "returned no token"),
    (200, b"[" * 200_000, "returned no token"),
    (400, json.dumps({"errors": [{"code": "X\nY", "message": "line1\nline2"}]}).encode(),
     "HTTP 400"),
    (400, b"{\"errors\": " + b"[" * 200_000, "HTTP 400"),
])
def test_hostile_token_service_answers_are_clean_errors(status, body, words):
    """Whatever a token service answers ends in one clean line, never another exception."""
    with LoggingServer(status=status, body=body) as realm:
        t = Transport("http://127.0.0.1:1", None, **FAST)
        with pytest.raises(RegistryError, match=words) as exc:
            t._fetch_token(realm.url + "/token", "svc", "repository:x:pull")
        assert "\n" not in str(exc.value) and "\r" not in str(exc.value)
