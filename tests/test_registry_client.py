"""registry.client/transport against real registries (plain, Basic, token) and a real fault proxy.

No mocks: ``registry``, ``basic_registry`` and ``token_registry`` are real ``docker-registry``
processes with the standard images (see tests/conftest.py); ``fault_proxy`` is a real HTTP
reverse proxy injecting 429/503, dropped connections, corrupted bytes and cross-host redirects.
"""
import base64
import json
import os
import subprocess
import sys
import threading
import time
import tracemalloc

import pytest

from datalad_udocker import oci
from datalad_udocker.digest import file_digest, sha256_digest
from datalad_udocker.errors import (AuthenticationError, DigestMismatch, NotFoundError,
                                    PlatformNotFound, RegistryError, UdockerError)
from datalad_udocker.reference import parse_reference
from datalad_udocker.registry import RegistryClient, parse_blob_url
from datalad_udocker.registry.credentials import Credentials
from datalad_udocker.registry.transport import (parse_challenge, redact_url,
                                                retry_after_seconds)
from fixtures.proxy import FaultProxy

FAST = dict(backoff=0.01, max_wait=5.0)


def client_for(host, **kw):
    """A client with fast retries; credentials from the (isolated) config unless given."""
    return RegistryClient(host, **{**FAST, **kw})


def ref(host, name):
    return parse_reference("%s/%s" % (host, name))


@pytest.fixture
def docker_config(tmp_path, monkeypatch):
    """Point DOCKER_CONFIG at a temp dir; ``docker_config(host, user, password)`` logs in."""
    cfgdir = tmp_path / "docker-config"
    cfgdir.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(cfgdir))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    auths = {}

    def login(host, user, password):
        auths[host] = {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}
        (cfgdir / "config.json").write_text(json.dumps({"auths": auths}))
    return login


def upload_blob(reg, name, data):
    """Upload ``data`` as a blob of repository ``name`` with the registry API; its digest."""
    digest = sha256_digest(data)
    r = reg.get(f"/v2/{name}/blobs/uploads/", method="POST")
    r.raise_for_status()
    loc = r.headers["Location"]
    loc = loc[len(reg.url):] if loc.startswith("http") else loc
    r = reg.get(loc + ("&" if "?" in loc else "?") + f"digest={digest}", method="PUT",
                data=data, headers={"Content-Type": "application/octet-stream"})
    r.raise_for_status()
    return digest


@pytest.fixture(scope="module")
def big_blob(registry):
    """(digest, size) of a 24 MiB random blob in ``test/big`` on the plain registry."""
    data = os.urandom(24 << 20)
    digest = upload_blob(registry, "test/big", data)
    return digest, len(data)


def download(client, url, digest, size, dest):
    got = []
    client.download_blob(url, digest, size, str(dest), progress=got.append)
    return sum(got)


# -- pure helpers ---------------------------------------------------------------------------------
def test_parse_blob_url():
    d = "sha256:" + "0f" * 32
    assert parse_blob_url(f"http://127.0.0.1:5000/v2/test/multi/blobs/{d}") == (
        "http://127.0.0.1:5000", "test/multi", d)
    assert parse_blob_url(f"https://registry-1.docker.io/v2/library/busybox/blobs/{d}")[1] == \
        "library/busybox"
    for bad in ("http://h/v2/x/manifests/latest", f"http://h/x/blobs/{d}", "",
                f"http://h/v2/x/blobs/{d}?token=1", "http://h/v2/x/blobs/sha256:abc"):
        with pytest.raises(UdockerError, match="not a registry blob URL"):
            parse_blob_url(bad)


def test_blob_url_and_scheme():
    d = "sha256:" + "0f" * 32
    hub = RegistryClient("docker.io", credentials=None)
    assert hub.blob_url("library/busybox", d) == \
        f"https://registry-1.docker.io/v2/library/busybox/blobs/{d}"
    assert RegistryClient("localhost:5000", credentials=None).scheme == "http"
    assert RegistryClient("[::1]:5000", credentials=None).scheme == "http"
    assert RegistryClient("reg.lan:5000", credentials=None).scheme == "https"
    assert RegistryClient("reg.lan:5000", ["reg.lan:5000"], credentials=None).scheme == "http"
    c = RegistryClient.for_url(f"http://127.0.0.1:5000/v2/a/b/blobs/{d}", credentials=None)
    assert c.base_url == "http://127.0.0.1:5000"
    # an http URL for a remote host is not silently used with https credentials
    remote = RegistryClient.for_url(f"http://reg.lan/v2/a/blobs/{d}", credentials=None)
    with pytest.raises(UdockerError, match="insecure-registries"):
        remote.blob_exists(f"http://reg.lan/v2/a/blobs/{d}")


def test_redact_url():
    assert redact_url("https://user:pw@s3.example/v2/x?X-Amz-Signature=abc&part=1&token=t") == \
        "https://s3.example/v2/x?X-Amz-Signature=REDACTED&part=1&token=REDACTED"
    assert redact_url("http://127.0.0.1:5000/v2/x/blobs/sha256:ab") == \
        "http://127.0.0.1:5000/v2/x/blobs/sha256:ab"


def test_parse_challenge():
    scheme, params = parse_challenge(
        'Bearer realm="https://auth.example/token",service="registry.example",'
        'scope="repository:a/b:pull,push"')
    assert scheme == "bearer"
    assert params == {"realm": "https://auth.example/token", "service": "registry.example",
                      "scope": "repository:a/b:pull,push"}
    assert parse_challenge('Basic realm="x"') == ("basic", {"realm": "x"})
    assert parse_challenge("Negotiate abc") is None
    assert parse_challenge(None) is None


def test_retry_after_seconds():
    assert retry_after_seconds("3") == 3.0
    now = time.time()
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now + 10))
    assert 8 <= retry_after_seconds(date, now=now) <= 11
    assert retry_after_seconds("garbage") is None
    assert retry_after_seconds(None) is None


def test_small_blob_size_limit():
    c = RegistryClient("127.0.0.1:1", credentials=None, **FAST)
    huge = oci.Descriptor(oci.OCI_CONFIG, "sha256:" + "0" * 64, 17 << 20)
    with pytest.raises(UdockerError, match="too large"):
        c.get_blob_bytes("x", huge)


# -- resolving images -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["test/single:1", "test/multi:1", "test/docker:1",
                                  "test/zstd:1", "test/plain:1", "test/glibc:1"])
def test_resolve_single_platform(registry, name):
    pushed = registry.images[name]
    img = client_for(registry.host).resolve(ref(registry.host, name))
    assert img.top is img.manifest and img.platform is None
    assert img.manifest.digest == pushed.manifest_digest
    assert img.manifest.raw == pushed.manifest_bytes
    assert img.manifest.media_type == pushed.manifest_media_type
    assert json.loads(img.config_raw) == pushed.config_json
    assert sha256_digest(img.config_raw) == pushed.config.digest
    assert [(l.digest, l.size, l.media_type) for l in img.manifest.layers] == \
        [(l.digest, l.size, l.media_type) for l in pushed.layers]


def test_resolve_media_types(registry):
    c = client_for(registry.host)
    docker = c.resolve(ref(registry.host, "test/docker:1")).manifest
    assert docker.media_type == oci.DOCKER_MANIFEST
    assert {l.media_type for l in docker.layers} == {
        "application/vnd.docker.image.rootfs.diff.tar.gzip"}
    zstd = c.resolve(ref(registry.host, "test/zstd:1")).manifest
    assert [oci.layer_compression(l.media_type) for l in zstd.layers] == ["zstd", "zstd"]
    multi = c.resolve(ref(registry.host, "test/multi:1")).manifest
    assert len(multi.layers) == 3


def test_resolve_by_digest(registry):
    pushed = registry.images["test/multi:1"]
    c = client_for(registry.host)
    by_digest = c.resolve(ref(registry.host, "test/multi@" + pushed.manifest_digest))
    both = c.resolve(ref(registry.host, "test/multi:2@" + pushed.manifest_digest))
    assert by_digest.manifest.digest == both.manifest.digest == pushed.manifest_digest


def test_resolve_multiplatform_default_is_host(registry):
    pushed = registry.images["test/multiarch:1"]
    host = oci.host_platform()
    if str(host) not in pushed.platforms:
        pytest.skip(f"test image has no {host} entry (has {sorted(pushed.platforms)})")
    img = client_for(registry.host).resolve(ref(registry.host, "test/multiarch:1"))
    assert isinstance(img.top, oci.Index)
    assert img.top.digest == pushed.manifest_digest
    assert str(img.platform) == str(host)
    assert img.manifest.digest == pushed.platforms[str(host)].manifest_digest


@pytest.mark.parametrize("wanted, expected", [
    ("linux/amd64", "linux/amd64"), ("linux/arm64", "linux/arm64"),
    ("linux/arm/v7", "linux/arm/v7"), ("linux/arm", "linux/arm/v7")])
def test_resolve_explicit_platform(registry, wanted, expected):
    pushed = registry.images["test/multiarch:1"].platforms[expected]
    img = client_for(registry.host).resolve(ref(registry.host, "test/multiarch:1"),
                                            oci.Platform.parse(wanted))
    assert str(img.platform) == expected
    assert img.manifest.digest == pushed.manifest_digest
    config = json.loads(img.config_raw)
    assert (config["os"], config["architecture"]) == tuple(expected.split("/")[:2])


def test_platform_not_in_index_lists_platforms(registry):
    with pytest.raises(PlatformNotFound) as exc:
        client_for(registry.host).resolve(ref(registry.host, "test/multiarch:1"),
                                          oci.Platform.parse("linux/s390x"))
    msg = str(exc.value)
    for plat in ("linux/s390x", "linux/amd64", "linux/arm64", "linux/arm/v7", "--platform"):
        assert plat in msg


def test_single_manifest_platform_check(registry):
    c = client_for(registry.host)
    arch = registry.images["test/single:1"].config_json["architecture"]
    img = c.resolve(ref(registry.host, "test/single:1"), oci.Platform("linux", arch))
    assert img.platform is None
    with pytest.raises(PlatformNotFound, match=f"single-platform image for linux/{arch}"):
        c.resolve(ref(registry.host, "test/single:1"), oci.Platform.parse("linux/s390x"))


@pytest.mark.parametrize("name", ["test/does-not-exist:1", "test/single:no-such-tag"])
def test_not_found(registry, name):
    with pytest.raises(NotFoundError) as exc:
        client_for(registry.host).resolve(ref(registry.host, name))
    # distribution 2.8 says MANIFEST_UNKNOWN for unknown repositories too
    assert exc.value.status == 404
    assert {"NAME_UNKNOWN", "MANIFEST_UNKNOWN"} & set(exc.value.codes)
    assert name.split(":")[0] in str(exc.value)
    assert ("check the image name" if "does-not" in name
            else "has no tag 'no-such-tag'; its tags: 1") in str(exc.value)


def test_connection_refused_is_temporary():
    c = RegistryClient("127.0.0.1:1", credentials=None, retries=1, backoff=0.01)
    with pytest.raises(RegistryError) as exc:
        c.get_manifest("x", "latest")
    assert exc.value.temporary and "cannot reach 127.0.0.1:1" in str(exc.value)


# -- blobs ----------------------------------------------------------------------------------------
def test_download_all_blobs(registry, tmp_path):
    pushed = registry.images["test/multi:1"]
    c = client_for(registry.host)
    for blob in [pushed.config] + pushed.layers:
        url = c.blob_url("test/multi", blob.digest)
        assert url == pushed.blob_url(blob.digest)
        dest = tmp_path / blob.digest
        assert download(c, url, blob.digest, blob.size, dest) == blob.size
        assert file_digest(dest) == blob.digest
        assert c.blob_exists(url)
    missing = c.blob_url("test/multi", "sha256:" + "0" * 64)
    assert not c.blob_exists(missing)
    with pytest.raises(NotFoundError, match="BLOB_UNKNOWN"):
        c.download_blob(missing, "sha256:" + "0" * 64, 10, str(tmp_path / "missing"))


def test_download_wrong_declared_size(registry, tmp_path):
    layer = registry.images["test/single:1"].layers[0]
    c = client_for(registry.host)
    dest = tmp_path / "layer"
    with pytest.raises(DigestMismatch):
        c.download_blob(c.blob_url("test/single", layer.digest), layer.digest,
                        layer.size - 1, str(dest))
    assert not dest.exists()


def test_resume_existing_partial_file(fault_proxy, registry, big_blob, tmp_path):
    digest, size = big_blob
    c = client_for(fault_proxy.host)
    dest = tmp_path / "blob"
    r = registry.get(f"/v2/test/big/blobs/{digest}", headers={"Range": "bytes=0-999999"})
    dest.write_bytes(r.content[:1000000])
    assert download(c, c.blob_url("test/big", digest), digest, size, dest) == size
    assert file_digest(dest) == digest
    gets = fault_proxy.seen(method="GET", path="/blobs/")
    assert [g.headers.get("range") for g in gets] == ["bytes=1000000-"]
    assert gets[0].status == 206


def test_corrupt_partial_file_restarts(fault_proxy, big_blob, tmp_path):
    digest, size = big_blob
    c = client_for(fault_proxy.host)
    dest = tmp_path / "blob"
    dest.write_bytes(b"\0" * 4096)                 # garbage left by someone else
    c.download_blob(c.blob_url("test/big", digest), digest, size, str(dest))
    assert file_digest(dest) == digest
    ranges = [g.headers.get("range") for g in fault_proxy.seen(method="GET", path="/blobs/")]
    assert ranges == ["bytes=4096-", None]


def test_dropped_connection_resumes_with_range(fault_proxy, big_blob, tmp_path):
    digest, size = big_blob
    cut = 5 << 20
    fault_proxy.drop_after(cut, times=2)
    c = client_for(fault_proxy.host)
    dest = tmp_path / "blob"
    assert download(c, c.blob_url("test/big", digest), digest, size, dest) == size
    assert file_digest(dest) == digest
    gets = fault_proxy.seen(method="GET", path="/blobs/")
    assert [g.fault for g in gets] == ["drop", "drop", None]
    assert gets[0].headers.get("range") is None
    assert gets[1].headers.get("range") == f"bytes={gets[0].bytes_sent}-"
    assert gets[2].headers.get("range") == f"bytes={gets[0].bytes_sent + gets[1].bytes_sent}-"
    assert gets[2].status == 206


def test_corrupted_byte_is_never_kept(fault_proxy, big_blob, tmp_path):
    digest, size = big_blob
    fault_proxy.corrupt(offset=123457, times=None)
    c = client_for(fault_proxy.host)
    dest = tmp_path / "blob"
    with pytest.raises(DigestMismatch, match=digest):
        c.download_blob(c.blob_url("test/big", digest), digest, size, str(dest))
    assert not dest.exists()


# -- one blob as parallel byte ranges (what the special remote does for a large layer) --------
@pytest.fixture
def small_parts(monkeypatch):
    """Ranges of 4 MiB: the 24 MiB ``big_blob`` is fetched as up to 6 ranges."""
    from datalad_udocker.registry import client
    monkeypatch.setattr(client, "PART_MIN", 4 << 20)


def blob_gets(proxy):
    return proxy.seen(method="GET", path="/blobs/")


def test_download_in_parts(fault_proxy, big_blob, small_parts, tmp_path):
    """Four ranges on four connections, each asked for by an exact Range and answered 206;
    the file is the blob, and progress counts each byte once."""
    digest, size = big_blob
    c = client_for(fault_proxy.host)
    dest = tmp_path / "blob"
    got = []
    c.download_blob(c.blob_url("test/big", digest), digest, size, str(dest), got.append,
                    parts=4)
    assert sum(got) == size and file_digest(dest) == digest
    bounds = [size * i // 4 for i in range(5)]
    assert sorted(g.headers.get("range") for g in blob_gets(fault_proxy)) == sorted(
        f"bytes={bounds[i]}-{bounds[i + 1] - 1}" for i in range(4))
    assert {g.status for g in blob_gets(fault_proxy)} == {206}


def test_corrupted_byte_in_a_part_is_never_kept(fault_proxy, big_blob, small_parts, tmp_path):
    """The same verdict as one stream: a byte flipped in any range fails the whole blob."""
    digest, size = big_blob
    fault_proxy.corrupt(offset=54321, times=None)
    c = client_for(fault_proxy.host)
    dest = tmp_path / "blob"
    with pytest.raises(DigestMismatch, match=digest):
        c.download_blob(c.blob_url("test/big", digest), digest, size, str(dest), parts=3)
    assert not dest.exists()
    assert len(blob_gets(fault_proxy)) == 3


def test_dropped_part_resumes_its_range(fault_proxy, big_blob, small_parts, tmp_path):
    digest, size = big_blob
    fault_proxy.drop_after(1 << 20, times=2)
    c = client_for(fault_proxy.host)
    dest = tmp_path / "blob"
    c.download_blob(c.blob_url("test/big", digest), digest, size, str(dest), parts=2)
    assert file_digest(dest) == digest
    gets = blob_gets(fault_proxy)
    dropped = [g for g in gets if g.fault == "drop"]
    assert len(dropped) == 2 and len(gets) == 4
    for g in dropped:           # its range asked again, from where the drop cut it
        first, last = map(int, g.headers["range"][len("bytes="):].split("-"))
        assert f"bytes={first + g.bytes_sent}-{last}" in [x.headers.get("range") for x in gets]


def test_server_without_ranges_gets_one_stream(fault_proxy, registry, big_blob, small_parts,
                                               tmp_path):
    """A server that answers every Range request with the whole blob (200)."""
    digest, size = big_blob
    data = registry.get(f"/v2/test/big/blobs/{digest}").content
    fault_proxy.serve(data, r"/blobs/", "application/octet-stream")
    c = client_for(fault_proxy.host)
    dest = tmp_path / "blob"
    got = []
    c.download_blob(c.blob_url("test/big", digest), digest, size, str(dest), got.append,
                    parts=4)
    assert file_digest(dest) == digest
    assert blob_gets(fault_proxy)[-1].headers.get("range") is None


def test_interrupted_parts_leave_a_prefix_to_resume(fault_proxy, big_blob, small_parts,
                                                    tmp_path):
    """Interrupted (here by the progress callback, as by Ctrl-C), the file keeps only the
    bytes hashed so far and no range thread writes to it afterwards; the next call resumes
    from there with one stream and gets the blob."""
    digest, size = big_blob
    c = client_for(fault_proxy.host)
    url = c.blob_url("test/big", digest)
    dest = tmp_path / "blob"
    hashed = []

    def progress(n):
        hashed.append(n)
        if sum(hashed) > 5 << 20:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        c.download_blob(url, digest, size, str(dest), progress, parts=4)
    kept = dest.stat().st_size
    assert kept == sum(hashed)
    open_here = [os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")]
    assert os.path.realpath(dest) not in open_here   # every range thread's descriptor is closed
    fault_proxy.clear()
    c.download_blob(url, digest, size, str(dest), parts=4)
    assert file_digest(dest) == digest
    assert [g.headers.get("range") for g in blob_gets(fault_proxy)] == [f"bytes={kept}-"]


def test_corrupted_config_is_refused(fault_proxy, registry):
    cfg = registry.images["test/single:1"].config
    fault_proxy.corrupt(offset=3, path=cfg.digest)
    with pytest.raises(DigestMismatch):
        client_for(fault_proxy.host).resolve(ref(fault_proxy.host, "test/single:1"))


def test_corrupted_manifest_is_refused(fault_proxy):
    fault_proxy.corrupt(offset=20, path=r"/manifests/", times=None)
    with pytest.raises(DigestMismatch, match="test/single"):
        client_for(fault_proxy.host).get_manifest("test/single", "1")


def test_memory_stays_flat(registry, big_blob, tmp_path):
    digest, size = big_blob
    c = client_for(registry.host)
    tracemalloc.start()
    try:
        c.download_blob(c.blob_url("test/big", digest), digest, size, str(tmp_path / "b"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 6 << 20, f"peak {peak} bytes for a {size}-byte blob"


# -- retries --------------------------------------------------------------------------------------
def test_429_retry_after_is_honoured(fault_proxy, registry):
    fault_proxy.rate_limit(times=1, retry_after=1, path=r"/manifests/")
    c = client_for(fault_proxy.host)
    start = time.monotonic()
    m = c.get_manifest("test/single", "1")
    assert time.monotonic() - start >= 0.95     # backoff alone would be 0.01 s
    assert m.digest == registry.images["test/single:1"].manifest_digest
    assert [r.status for r in fault_proxy.seen(path="/manifests/")] == [429, 200]


def test_503_is_retried(fault_proxy, registry, tmp_path):
    layer = registry.images["test/single:1"].layers[0]
    fault_proxy.fail_with_status(503, times=2)
    fault_proxy.fail_with_status(502, times=1)
    c = client_for(fault_proxy.host)
    dest = tmp_path / "layer"
    c.download_blob(c.blob_url("test/single", layer.digest), layer.digest, layer.size, str(dest))
    assert file_digest(dest) == layer.digest
    assert [r.status for r in fault_proxy.seen(path="/blobs/")] == [503, 503, 502, 200]


def test_retries_give_up(fault_proxy):
    fault_proxy.fail_with_status(503, times=None, path=r"/manifests/")
    c = client_for(fault_proxy.host, retries=2)
    with pytest.raises(RegistryError) as exc:
        c.get_manifest("test/single", "1")
    assert exc.value.status == 503 and exc.value.temporary
    assert "INJECTED" in str(exc.value)
    assert len(fault_proxy.seen(path="/manifests/")) == 3


# -- Basic auth -----------------------------------------------------------------------------------
def test_basic_auth_from_docker_config(basic_registry, docker_config, tmp_path):
    docker_config(basic_registry.host, basic_registry.username, basic_registry.password)
    c = client_for(basic_registry.host)
    assert c.transport.credentials.username == basic_registry.username
    img = c.resolve(ref(basic_registry.host, "test/multi:1"))
    layer = img.manifest.layers[0]
    dest = tmp_path / "layer"
    c.download_blob(c.blob_url("test/multi", layer.digest), layer.digest, layer.size, str(dest))
    assert file_digest(dest) == layer.digest


def test_basic_auth_wrong_password(basic_registry, docker_config):
    docker_config(basic_registry.host, basic_registry.username, "wrong-secret-pw")
    with pytest.raises(AuthenticationError) as exc:
        client_for(basic_registry.host).resolve(ref(basic_registry.host, "test/single:1"))
    msg = str(exc.value)
    assert exc.value.status == 401
    assert "docker login" in msg and "config.json" in msg and basic_registry.username in msg
    assert "wrong-secret-pw" not in msg and "\n" not in msg


def test_basic_auth_missing_credentials(basic_registry, docker_config):
    with pytest.raises(AuthenticationError, match="requires authentication"):
        client_for(basic_registry.host).get_manifest("test/single", "1")


def test_redirect_does_not_carry_authorization(basic_registry, tmp_path):
    basic = "Basic " + base64.b64encode(basic_registry.creds.encode()).decode()
    with FaultProxy(basic_registry.host, cdn_upstream_headers={"Authorization": basic}) as proxy:
        proxy.redirect_blobs()
        c = client_for(proxy.host, credentials=Credentials(basic_registry.username,
                                                           basic_registry.password))
        img = c.resolve(ref(proxy.host, "test/multi:1"))
        layer = img.manifest.layers[-1]
        dest = tmp_path / "layer"
        c.download_blob(c.blob_url("test/multi", layer.digest), layer.digest, layer.size,
                        str(dest))
        assert file_digest(dest) == layer.digest
        cdn = proxy.seen(server="cdn")
        assert cdn and all("authorization" not in r.headers for r in cdn)
        assert {r.path.split("/blobs/")[1] for r in cdn} == {img.manifest.config.digest,
                                                            layer.digest}
        redirected = [r for r in proxy.seen(server="proxy", path="/blobs/") if r.status == 307]
        assert len(redirected) == 2       # config and layer; both carried our credentials
        assert all(r.headers.get("authorization") == basic for r in redirected)


# -- Bearer tokens --------------------------------------------------------------------------------
def test_token_anonymous(token_registry, token_issuer, docker_config):
    c = client_for(token_registry.host)
    assert c.transport.credentials is None
    img = c.resolve(ref(token_registry.host, "test/multi:1"))
    assert img.manifest.digest == token_registry.images["test/multi:1"].manifest_digest
    assert [(r.account, r.scopes, r.status) for r in token_issuer.requests] == [
        (None, ["repository:test/multi:pull"], 200)]


def test_token_with_credentials(token_registry, token_issuer, docker_config):
    docker_config(token_registry.host, token_registry.username, token_registry.password)
    token_issuer.anonymous_pull = False
    c = client_for(token_registry.host)
    img = c.resolve(ref(token_registry.host, "test/single:1"))
    assert img.manifest.digest == token_registry.images["test/single:1"].manifest_digest
    assert [r.account for r in token_issuer.requests] == [token_registry.username]


def test_token_wrong_credentials(token_registry, token_issuer, docker_config):
    docker_config(token_registry.host, token_registry.username, "bad-token-pw")
    with pytest.raises(AuthenticationError) as exc:
        client_for(token_registry.host).get_manifest("test/single", "1")
    msg = str(exc.value)
    assert "docker login" in msg and "bad-token-pw" not in msg
    assert token_issuer.requests[-1].status == 401


def test_token_anonymous_refused(token_registry, token_issuer, docker_config):
    token_issuer.anonymous_pull = False
    with pytest.raises(AuthenticationError, match="requires authentication"):
        client_for(token_registry.host).get_manifest("test/single", "1")


def test_token_cached_per_scope(token_registry, token_issuer, docker_config, tmp_path):
    c = client_for(token_registry.host)
    multi = c.resolve(ref(token_registry.host, "test/multi:1"))
    c.resolve(ref(token_registry.host, "test/multi:2"))
    # parallel downloads share one token for the scope
    errors = []

    def fetch(layer):
        try:
            c.download_blob(c.blob_url("test/multi", layer.digest), layer.digest, layer.size,
                            str(tmp_path / layer.hex))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=fetch, args=(l,)) for l in multi.manifest.layers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    c.resolve(ref(token_registry.host, "test/single:1"))
    c.get_manifest("test/multi", "1")
    assert [r.scopes for r in token_issuer.requests] == [
        ["repository:test/multi:pull"], ["repository:test/single:pull"]]
    assert c.transport.token_requests == 2


def test_token_refreshed_before_expiry(token_registry, token_issuer):
    token_issuer.expires_in = 2
    token_issuer.strict_expiry = True          # the registry really rejects it after 2 s
    c = client_for(token_registry.host, credentials=None)
    c.get_manifest("test/single", "1")
    c.get_manifest("test/single", "1")
    assert len(token_issuer.requests) == 1
    time.sleep(2.1)
    c.get_manifest("test/single", "1")
    assert len(token_issuer.requests) == 2
    assert all(r.expires_in == 2 for r in token_issuer.requests)


def test_rejected_token_is_replaced(token_registry, token_issuer):
    token_issuer.expires_in = 2                # whole-second exp: dead 1-2 s after issue
    token_issuer.strict_expiry = True
    c = client_for(token_registry.host, credentials=None)
    c.get_manifest("test/single", "1")
    # pretend our clock disagrees with the registry's: the cached token looks fresh
    for token in c.transport._tokens.values():
        token.expires_at = time.monotonic() + 3600
    time.sleep(2.2)
    m = c.get_manifest("test/single", "1")
    assert m.digest == token_registry.images["test/single:1"].manifest_digest
    assert len(token_issuer.requests) == 2


def test_identity_token_uses_oauth2_refresh_grant(token_registry, token_issuer):
    creds = Credentials("<token>", "refresh-token-value", identity_token=True)
    c = client_for(token_registry.host, credentials=creds)
    c.get_manifest("test/single", "1")
    (req,) = token_issuer.requests
    assert (req.method, req.client_id, req.scopes) == (
        "POST", "datalad-udocker", ["repository:test/single:pull"])
    assert "refresh-token-value" not in req.path


def test_killed_parts_resume_from_the_hashed_prefix(fault_proxy, big_blob, small_parts,
                                                    tmp_path):
    """A process killed (SIGKILL: no clean-up) while its ranges fill the file leaves a file of
    the blob's full length with a hole; the next call keeps only the prefix that was hashed
    and resumes from there with one request, instead of hashing the whole file as a prefix,
    failing and downloading everything again.  No side file is left."""
    digest, size = big_blob
    c = client_for(fault_proxy.host)
    url = c.blob_url("test/big", digest)
    dest = tmp_path / "blob"
    code = (f"import os, sys, time\nsys.path[:0] = {sys.path!r}\n"
            "from datalad_udocker.registry import client\n"
            f"client.PART_MIN = 4 << 20\ndest, size = {str(dest)!r}, {size}\n"
            "hashed = []\nwrite = client._PartWriter.write\n"
            "def stalled(self, data):\n"
            "    if self.index == 0 and self.written >= 1 << 20:\n"
            "        # range 0 stalls; once the last range reached the end and some bytes are\n"
            "        # hashed, the process dies as a kill would find it\n"
            "        deadline = time.monotonic() + 60\n"
            "        while (os.path.getsize(dest) < size or not hashed) and \\\n"
            "                time.monotonic() < deadline:\n"
            "            time.sleep(0.01)\n"
            "        os.kill(os.getpid(), 9)\n"
            "    write(self, data)\n"
            "client._PartWriter.write = stalled\n"
            f"c = client.RegistryClient({fault_proxy.host!r}, backoff=0.01, max_wait=5.0)\n"
            f"c.download_blob({url!r}, {digest!r}, size, dest, hashed.append, parts=4)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert dest.stat().st_size == size           # the whole length, with a hole in range 0
    fault_proxy.clear()
    c.download_blob(url, digest, size, str(dest), parts=4)
    assert file_digest(dest) == digest
    [get] = blob_gets(fault_proxy)
    assert "range" in get.headers, "the whole blob was downloaded again"
    start = int(get.headers["range"][len("bytes="):].rstrip("-"))
    assert 0 < start <= size // 4 and get.headers["range"] == f"bytes={start}-"
    assert sorted(os.listdir(tmp_path)) == ["blob"]
