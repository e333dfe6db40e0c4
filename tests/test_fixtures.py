"""Prove the test fixtures themselves work: real registries, images, proxy, dockerd, users."""
from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import subprocess
import tarfile
import time

import pytest
import requests

from fixtures import images as im
from fixtures.catalogue import build_catalogue
from fixtures.push import BlobInfo

STANDARD = ["test/single:1", "test/shared:1", "test/multi:1", "test/multi:2", "test/docker:1",
            "test/zstd:1", "test/glibc:1", "test/plain:1", "test/multiarch:1"]


def blob(registry, img, info: BlobInfo) -> bytes:
    r = registry.get(f"/v2/{img.name}/blobs/{info.digest}")
    assert r.status_code == 200, r.text
    assert "sha256:" + hashlib.sha256(r.content).hexdigest() == info.digest
    assert len(r.content) == info.size
    return r.content


def untar(data: bytes) -> dict:
    """{name: TarInfo-ish (type, data, linkname)} of a (compressed) layer blob."""
    if data[:2] == b"\x1f\x8b":
        data = __import__("gzip").decompress(data)
    elif data[:4] == b"\x28\xb5\x2f\xfd":
        data = __import__("zstandard").ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar.getmembers():
            out[m.name] = (m, tar.extractfile(m).read() if m.isfile() else None)
    return out


# -- registries ------------------------------------------------------------------------------
def test_plain_registry_serves_v2(registry):
    r = requests.get(registry.url + "/v2/", timeout=10)
    assert r.status_code == 200
    assert r.headers["Docker-Distribution-Api-Version"] == "registry/2.0"


def test_basic_registry_requires_credentials(basic_registry):
    r = requests.get(basic_registry.url + "/v2/", timeout=10)
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"].startswith("Basic ")
    ok = requests.get(basic_registry.url + "/v2/", timeout=10,
                      auth=(basic_registry.username, basic_registry.password))
    assert ok.status_code == 200
    bad = requests.get(basic_registry.url + "/v2/", timeout=10,
                       auth=(basic_registry.username, "wrong"))
    assert bad.status_code == 401


@pytest.mark.parametrize("flavour", ["registry", "basic_registry", "token_registry"])
@pytest.mark.parametrize("ref", STANDARD)
def test_standard_manifests_fetchable(request, flavour, ref):
    reg = request.getfixturevalue(flavour)
    img = reg.images[ref]
    name, tag = ref.split(":")
    r = reg.get(f"/v2/{name}/manifests/{tag}", headers={"Accept": img.manifest_media_type})
    assert r.status_code == 200, r.text
    assert r.headers["Docker-Content-Digest"] == img.manifest_digest
    assert r.content == img.manifest_bytes
    for child in img.platforms.values():
        assert child.config is not None
    if not img.is_index:
        blob(reg, img, img.config)
        assert img.config_json["rootfs"]["diff_ids"]
        assert len(img.config_json["rootfs"]["diff_ids"]) == len(img.layers)


def test_token_registry_bearer_flow(token_registry, token_issuer):
    reg = token_registry
    r = requests.get(f"{reg.url}/v2/test/single/manifests/1", timeout=10)
    assert r.status_code == 401
    challenge = r.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ") and reg.issuer.realm in challenge
    assert 'scope="repository:test/single:pull"' in challenge
    # with credentials
    token_issuer.expires_in = 123
    tok = reg.fetch_token(challenge)
    ok = requests.get(f"{reg.url}/v2/test/single/manifests/1", timeout=10,
                      headers={"Authorization": f"Bearer {tok}",
                               "Accept": reg.images["test/single:1"].manifest_media_type})
    assert ok.status_code == 200
    seen = token_issuer.requests[-1]
    assert seen.account == reg.username and seen.scopes == ["repository:test/single:pull"]
    assert seen.expires_in == 123 and seen.service == reg.issuer.service
    assert seen.granted == [{"type": "repository", "name": "test/single", "actions": ["pull"]}]
    # a token is bound to its scope: it does not open another repository
    other = requests.get(f"{reg.url}/v2/test/multi/manifests/1", timeout=10,
                         headers={"Authorization": f"Bearer {tok}"})
    assert other.status_code == 401


def test_token_registry_anonymous_and_bad_credentials(token_registry, token_issuer):
    reg = token_registry
    assert reg.get("/v2/test/single/manifests/1", anonymous=True,
                   headers={"Accept": im.OCI_MANIFEST}).status_code == 200
    assert token_issuer.requests[-1].account is None
    token_issuer.anonymous_pull = False
    assert reg.get("/v2/test/single/manifests/1", anonymous=True).status_code == 401
    assert token_issuer.requests[-1].granted == []
    r = requests.get(reg.issuer.realm, params={"service": reg.issuer.service,
                                               "scope": "repository:test/single:pull"},
                     auth=(reg.username, "wrong"), timeout=10)
    assert r.status_code == 401
    assert token_issuer.requests[-1].status == 401


def test_token_strict_expiry_is_enforced_by_registry(token_registry, token_issuer):
    reg = token_registry
    token_issuer.expires_in, token_issuer.strict_expiry = 2, True
    r = requests.get(f"{reg.url}/v2/test/single/manifests/1", timeout=10)
    tok = reg.fetch_token(r.headers["WWW-Authenticate"])
    hdr = {"Authorization": f"Bearer {tok}", "Accept": im.OCI_MANIFEST}
    url = f"{reg.url}/v2/test/single/manifests/1"
    assert requests.get(url, headers=hdr, timeout=10).status_code == 200
    time.sleep(3.2)
    assert requests.get(url, headers=hdr, timeout=10).status_code == 401


@pytest.mark.parametrize("flavour", ["registry", "basic_registry", "token_registry"])
def test_skopeo_inspect(request, flavour):
    reg = request.getfixturevalue(flavour)
    out = subprocess.run(["skopeo", "inspect", *reg.skopeo_args(""),
                          f"docker://{reg.host}/test/multi:1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    img = reg.images["test/multi:1"]
    assert info["Digest"] == img.manifest_digest
    assert info["Layers"] == [layer.digest for layer in img.layers]
    assert "GREETING=hello" in info["Env"]


# -- image contents --------------------------------------------------------------------------
def test_catalogue_layer_properties(registry):
    imgs = registry.images
    assert set(imgs) == set(STANDARD)
    single, shared = imgs["test/single:1"], imgs["test/shared:1"]
    assert shared.layers[0] == single.layers[0]
    m1, m2 = imgs["test/multi:1"], imgs["test/multi:2"]
    assert len(m1.layers) == 3 and m1.layers[:2] == m2.layers[:2]
    assert m1.layers[2] != m2.layers[2]
    cfg = m1.config_json["config"]
    assert cfg["Entrypoint"] == ["/app/run.sh"] and cfg["Cmd"] == ["default-arg"]
    assert cfg["WorkingDir"] == "/app" and "MULTI_VERSION=1" in cfg["Env"]
    docker = imgs["test/docker:1"]
    assert docker.manifest_media_type == im.DOCKER_MANIFEST
    assert docker.config.media_type == im.DOCKER_CONFIG
    assert {layer.media_type for layer in docker.layers} == {im.DOCKER_LAYER}
    assert {layer.media_type for layer in imgs["test/zstd:1"].layers} == {im.OCI_LAYER["zstd"]}
    assert [layer.media_type for layer in imgs["test/plain:1"].layers] == [im.OCI_LAYER["none"]]
    multi = imgs["test/multiarch:1"]
    assert multi.is_index and multi.manifest_media_type == im.OCI_INDEX
    assert set(multi.platforms) == {"linux/amd64", "linux/arm64", "linux/arm/v7"}
    assert len({p.manifest_digest for p in multi.platforms.values()}) == 3
    assert multi.platforms["linux/arm/v7"].config_json["variant"] == "v7"
    assert single.layers[0].annex_key.startswith(f"SHA256-s{single.layers[0].size}--")


def test_pushed_blobs_are_the_locally_built_ones(registry, tmp_path):
    """skopeo must not have re-encoded OCI layers: registry digests == built digests."""
    entries = {e.ref: e for e in build_catalogue(tmp_path)}
    for ref in ("test/single:1", "test/multi:1", "test/zstd:1"):
        e = entries[ref]
        index = json.loads((e.layout / "index.json").read_text())
        desc = next(m for m in index["manifests"]
                    if m["annotations"]["org.opencontainers.image.ref.name"] == e.src_tag)
        local = json.loads((e.layout / "blobs/sha256" / desc["digest"][7:]).read_text())
        assert [l["digest"] for l in local["layers"]] == \
            [l.digest for l in registry.images[ref].layers]


def test_multi_layers_whiteouts_and_view(registry):
    img = registry.images["test/multi:1"]
    middle = untar(blob(registry, img, img.layers[1]))
    assert "data/.wh.remove-me.txt" in middle and "data/.wh.dir-gone" in middle
    assert "opaque/.wh..wh..opq" in middle
    assert middle["app/run.sh"][0].mode == 0o755
    view = img.expected_files
    assert "data/keep.txt" in view and "data/added.txt" in view and "opaque/new.txt" in view
    for gone in ("data/remove-me.txt", "data/dir-gone", "data/dir-gone/inner.txt",
                 "opaque/old1.txt", "opaque/sub", "opaque/sub/old2.txt"):
        assert gone not in view
    assert not any(".wh." in p for p in view)
    v2 = registry.images["test/multi:2"].expected_files
    assert v2["app/version.txt"].data == b"2\n" and view["app/version.txt"].data == b"1\n"


def _extract_and_chroot(registry, img, tmp_path, script):
    root = tmp_path / "root"
    root.mkdir()
    for layer in img.layers:
        with tarfile.open(fileobj=io.BytesIO(blob(registry, img, layer))) as tar:
            tar.extractall(root)
    return subprocess.run(["chroot", str(root), "/bin/sh", "-c", script],
                          capture_output=True, text=True, timeout=30,
                          env={"PATH": im.DEFAULT_PATH})


@pytest.mark.parametrize("ref", ["test/single:1", "test/glibc:1"])
def test_rootfs_images_run_in_chroot(registry, tmp_path, ref):
    if os.geteuid() != 0:
        pytest.skip("chroot needs root; image runnability is then covered by udocker tests")
    res = _extract_and_chroot(registry, registry.images[ref], tmp_path,
                              "echo hello; uname -s; ls /bin/sh; cat /etc/passwd | head -1")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[:3] == ["hello", "Linux", "/bin/sh"]


def test_glibc_image_is_dynamically_linked(registry):
    img = registry.images["test/glibc:1"]
    files = untar(blob(registry, img, img.layers[0]))
    assert files["bin/sh"][0].issym() and files["bin/sh"][0].linkname == "dash"
    assert files["bin/dash"][1][:4] == b"\x7fELF"
    assert "lib64/ld-linux-x86-64.so.2" in files
    assert "lib/x86_64-linux-gnu/libc.so.6" in files


def test_make_registry_factory_and_upload(make_registry):
    reg = make_registry("plain", images=["test/single:1"])
    assert set(reg.images) == {"test/single:1"}
    assert requests.get(f"{reg.url}/v2/test/multi/manifests/1", timeout=10).status_code == 404


# -- fault proxy -----------------------------------------------------------------------------
def _blob_url(proxy, img, layer=0):
    return f"{proxy.url}/v2/{img.name}/blobs/{img.layers[layer].digest}"


def test_proxy_forwards_and_records(registry, fault_proxy):
    img = registry.images["test/multi:1"]
    r = requests.get(_blob_url(fault_proxy, img, 1), timeout=10)
    assert r.status_code == 200 and len(r.content) == img.layers[1].size
    rec = fault_proxy.seen(method="GET")[-1]
    assert rec.server == "proxy" and rec.status == 200 and rec.bytes_sent == img.layers[1].size
    assert rec.headers["host"] == fault_proxy.host


def test_proxy_range(registry, fault_proxy):
    img = registry.images["test/single:1"]
    full = blob(registry, img, img.layers[0])
    r = requests.get(_blob_url(fault_proxy, img), headers={"Range": "bytes=100-199"}, timeout=10)
    assert r.status_code == 206 and r.content == full[100:200]
    assert fault_proxy.seen()[-1].headers["range"] == "bytes=100-199"


@pytest.mark.parametrize("status,headers", [(429, {"retry-after": "2"}), (503, {})])
def test_proxy_status_faults(registry, fault_proxy, status, headers):
    img = registry.images["test/single:1"]
    if status == 429:
        fault_proxy.rate_limit(times=2, retry_after=2)
    else:
        fault_proxy.fail_with_status(503, times=2)
    got = [requests.get(_blob_url(fault_proxy, img), timeout=10) for _ in range(3)]
    assert [r.status_code for r in got] == [status, status, 200]
    for key, value in headers.items():
        assert got[0].headers[key] == value
    assert [r.fault for r in fault_proxy.seen()] == ["status", "status", None]


def test_proxy_drop_after(registry, fault_proxy):
    img = registry.images["test/single:1"]
    fault_proxy.drop_after(1000, times=1)
    with pytest.raises(requests.exceptions.RequestException):
        requests.get(_blob_url(fault_proxy, img), timeout=10).content
    assert fault_proxy.seen()[-1].bytes_sent == 1000
    r = requests.get(_blob_url(fault_proxy, img), timeout=10)
    assert r.status_code == 200 and len(r.content) == img.layers[0].size


def test_proxy_drop_seen_by_raw_client(registry, fault_proxy):
    img = registry.images["test/single:1"]
    fault_proxy.drop_after(5000)
    conn = http.client.HTTPConnection(fault_proxy.host, timeout=10)
    conn.request("GET", f"/v2/{img.name}/blobs/{img.layers[0].digest}")
    resp = conn.getresponse()
    assert int(resp.getheader("Content-Length")) == img.layers[0].size
    with pytest.raises(http.client.IncompleteRead) as exc:
        resp.read()
    assert len(exc.value.partial) == 5000


def test_proxy_corrupt(registry, fault_proxy):
    img = registry.images["test/single:1"]
    good = blob(registry, img, img.layers[0])
    fault_proxy.corrupt(offset=70000)
    bad = requests.get(_blob_url(fault_proxy, img), timeout=10).content
    assert len(bad) == len(good) and bad != good
    assert [i for i in range(len(good)) if bad[i] != good[i]] == [70000]
    assert requests.get(_blob_url(fault_proxy, img), timeout=10).content == good


def test_proxy_redirect_to_other_host(registry, fault_proxy):
    img = registry.images["test/single:1"]
    fault_proxy.redirect_blobs()
    r = requests.get(_blob_url(fault_proxy, img), timeout=10,
                     headers={"Authorization": "Bearer secret-token"})
    assert r.status_code == 200 and len(r.content) == img.layers[0].size
    assert [h.status_code for h in r.history] == [307]
    assert r.history[0].headers["Location"].startswith(f"http://localhost:{fault_proxy.cdn_port}/")
    first, = fault_proxy.seen(server="proxy")
    cdn, = fault_proxy.seen(server="cdn")
    assert first.headers["authorization"] == "Bearer secret-token"
    assert "authorization" not in cdn.headers  # requests drops it across hosts
    assert cdn.status == 200 and cdn.bytes_sent == img.layers[0].size


def test_skopeo_copies_through_proxy(registry, fault_proxy, tmp_path):
    out = tmp_path / "oci"
    res = subprocess.run(["skopeo", "--insecure-policy", "copy", "--src-tls-verify=false",
                          f"docker://{fault_proxy.host}/test/multi:2", f"oci:{out}:x"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert len(fault_proxy.seen(path=r"/blobs/")) == 4  # config + 3 layers


# -- dockerd and users -----------------------------------------------------------------------
def test_dockerd_answers(dockerd):
    out = dockerd.docker("version", "--format", "{{.Server.Version}}").stdout.decode().strip()
    assert out and out[0].isdigit()


def test_dockerd_pulls_from_fixture_registry(dockerd, registry):
    ref = registry.images["test/docker:1"].reference
    dockerd.docker("pull", ref)
    res = dockerd.docker("run", "--rm", "--network=none", ref, "/bin/sh", "-c", "cat docker/marker.txt")
    assert res.stdout == b"v2s2\n"


def test_nonroot_user(nonroot):
    res = nonroot.run(["id", "-u"])
    assert int(res.stdout) != 0 and int(res.stdout) == nonroot.uid
    env = nonroot.run("echo $HOME; git config user.email; command -v python").stdout.split()
    assert env[0] == str(nonroot.home) and env[1] == "udtest@example.invalid"
    assert env[2].endswith("/.venv/bin/python")
    d = nonroot.make_tempdir()
    nonroot.run(["touch", str(d / "x")])
    assert (d / "x").stat().st_uid == nonroot.uid


def test_nonroot_can_use_the_venv(nonroot):
    res = nonroot.run(["python", "-c", "import datalad, udocker, requests; print('ok')"])
    assert res.stdout.strip() == "ok"


def test_session_environment(git_home):
    assert os.environ["HOME"] == str(git_home)
    assert os.environ["GIT_CONFIG_NOSYSTEM"] == "1"
    assert os.environ["PATH"].split(os.pathsep)[0].endswith("/.venv/bin")
    out = subprocess.run(["git", "config", "--global", "user.name"], capture_output=True, text=True)
    assert out.stdout.strip() == "DataLad Udocker Tests"
