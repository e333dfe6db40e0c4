"""udocker-export: images from a dataset into a real Docker Engine and into skopeo."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import datalad.api as dl

import datalad_udocker.commands.export_image  # noqa: F401  (binds Dataset.udocker_export)
from checks import git
from datalad_udocker.archive.source import open_source
from fixtures.util import stop_process

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def stored(registry, tmp_path_factory):
    """A dataset holding test/multi:1 (3 layers), test/docker:1 (v2s2 media types) and
    test/zstd:1 (zstd layers)."""
    ds = dl.create(tmp_path_factory.mktemp("export") / "ds", result_renderer="disabled")
    for ref in ("test/multi:1", "test/docker:1", "test/zstd:1"):
        res = ds.udocker_import(registry.images[ref].reference, result_renderer="disabled",
                                return_type="list")
        assert res[0]["status"] == "ok", res
    return ds


def export(ds, name, **kw):
    res = ds.udocker_export(name, result_renderer="disabled", return_type="list",
                            on_failure="ignore", **kw)
    assert len(res) == 1, res
    return res[0]


def load_and_run(dockerd, archive_args, tag, *cmd, input=None):
    out = dockerd.docker("load", *archive_args, input=input).stdout.decode()
    assert tag in out, out
    run = dockerd.docker("run", "--rm", tag, *cmd)
    dockerd.docker("rmi", tag)
    return run.stdout.decode()


def test_export_multi_layer_loads_and_runs(stored, registry, dockerd, tmp_path):
    pushed = registry.images["test/multi:1"]
    out = tmp_path / "multi.tar"
    res = export(stored, "multi", output=str(out))
    assert res["status"] == "ok", res
    assert res["path"] == str(out)
    with tarfile.open(out) as t:
        entry = json.loads(t.extractfile("manifest.json").read())[0]
        # layers as stored: the registry's compressed blobs, named by digest
        assert entry["Layers"] == ["blobs/sha256/" + l.digest.split(":")[1]
                                   for l in pushed.layers]
        for l in pushed.layers:
            assert t.getmember("blobs/sha256/" + l.digest.split(":")[1]).size == l.size
    assert entry["RepoTags"] == [pushed.reference]
    text = load_and_run(dockerd, ["-i", str(out)], pushed.reference)
    assert "greeting=hello version=1 cwd=/app args=default-arg" in text


def test_export_layers_and_whiteouts_seen_by_docker(stored, registry, dockerd, tmp_path):
    pushed = registry.images["test/multi:1"]
    out = tmp_path / "m.tar"
    assert export(stored, "multi", output=str(out))["status"] == "ok"
    dockerd.docker("load", "-i", str(out))
    try:
        ls = dockerd.docker("run", "--rm", "--entrypoint", "/bin/sh", pushed.reference,
                            "-c", "ls /data /opaque; cat /app/version.txt").stdout.decode()
    finally:
        dockerd.docker("rmi", pushed.reference)
    assert "keep.txt" in ls and "added.txt" in ls and "new.txt" in ls
    assert "remove-me.txt" not in ls and "dir-gone" not in ls and "old1.txt" not in ls
    assert ls.strip().endswith("1")


def test_export_docker_media_types(stored, registry, dockerd, tmp_path):
    pushed = registry.images["test/docker:1"]
    out = tmp_path / "d.tar"
    assert export(stored, "docker", output=str(out))["status"] == "ok"
    text = load_and_run(dockerd, ["-i", str(out)], pushed.reference, "cat",
                        "/docker/marker.txt")
    assert text == "v2s2\n"


def test_zstd_layers_are_exported_plain_and_load_into_docker(stored, registry, dockerd,
                                                           tmp_path):
    """Docker 20.10 cannot read zstd: the docker-archive holds those layers as plain tars
    under their diff_id (the image ID is the same), and the image loads and runs."""
    pushed = registry.images["test/zstd:1"]
    out = tmp_path / "z.tar"
    assert export(stored, "zstd", output=str(out))["status"] == "ok"
    diff_ids = pushed.config_json["rootfs"]["diff_ids"]
    with tarfile.open(out) as t:
        entry = json.loads(t.extractfile("manifest.json").read())[0]
        assert entry["Layers"] == ["blobs/sha256/" + d.split(":")[1] for d in diff_ids]
        for member in entry["Layers"]:
            data = t.extractfile(member).read()
            assert "sha256:" + hashlib.sha256(data).hexdigest() == "sha256:" + member[-64:]
        index = json.loads(t.extractfile("index.json").read())["manifests"]
        manifest = json.loads(t.extractfile("blobs/sha256/" + index[0]["digest"][7:]).read())
        assert [(l["mediaType"], l["digest"]) for l in manifest["layers"]] == [
            ("application/vnd.oci.image.layer.v1.tar", d) for d in diff_ids]
    text = load_and_run(dockerd, ["-i", str(out)], pushed.reference, "cat", "/zstd/marker.txt")
    assert text == "zstd\n"
    # the oci-archive keeps the registry's zstd blobs (OCI tools read zstd)
    oci_out = tmp_path / "z-oci.tar"
    assert export(stored, "zstd", output=str(oci_out), format="oci-archive")["status"] == "ok"
    with tarfile.open(oci_out) as t:
        for layer in pushed.layers:
            assert t.getmember("blobs/sha256/" + layer.digest.split(":")[1]).size == layer.size


@pytest.mark.parametrize("name", ["multi", "docker", "zstd"])
def test_exports_are_identical_and_load_under_one_image_id(stored, registry, dockerd, tmp_path,
                                                           name):
    """Two exports are the same bytes, and `docker load` gives both the same image ID: the
    config's digest (Docker's image ID)."""
    pushed = registry.images[f"test/{name}:1"]
    outs = [tmp_path / "a.tar", tmp_path / "b.tar"]
    for out in outs:
        assert export(stored, name, output=str(out))["status"] == "ok"
    assert outs[0].read_bytes() == outs[1].read_bytes()
    ids = []
    for out in outs:
        dockerd.docker("load", "-i", str(out))
        ids.append(dockerd.docker("image", "inspect", "--format", "{{.Id}}",
                                  pushed.reference).stdout.decode().strip())
        dockerd.docker("rmi", pushed.reference)
    assert ids[0] == ids[1] == pushed.config_digest, ids


@pytest.mark.parametrize("fmt", ["docker-archive", "oci-archive"])
def test_a_docker_image_export_is_read_by_oci_tools_and_reimports_as_itself(
        stored, registry, ds, tmp_path, fmt):
    """A v2s2 image's export names an OCI manifest in index.json (skopeo finds it by tag) and
    keeps the registry's manifest, which a re-import stores again."""
    pushed = registry.images["test/docker:1"]
    out = tmp_path / "d.tar"
    assert export(stored, "docker", output=str(out), format=fmt)["status"] == "ok"
    if fmt == "oci-archive":
        res = subprocess.run(["skopeo", "inspect", f"oci-archive:{out}:1"], capture_output=True,
                             text=True)
        assert res.returncode == 0, res.stderr
    # read on its own (no registry), the archive gives the registry's manifest back
    assert open_source(f"{fmt}:{out}").manifest.digest == pushed.manifest_digest
    res = ds.udocker_import(f"{fmt}:{out}", name="again", result_renderer="disabled",
                            return_type="list")
    assert res[0]["status"] == "ok", res
    assert res[0]["manifest_digest"] == pushed.manifest_digest


@pytest.mark.parametrize("fmt", ["docker-archive", "oci-archive"])
def test_skopeo_inspects_exports(stored, registry, tmp_path, fmt):
    pushed = registry.images["test/multi:1"]
    out = tmp_path / "x.tar"
    assert export(stored, "multi", output=str(out), format=fmt)["status"] == "ok"
    res = subprocess.run(["skopeo", "inspect", f"{fmt}:{out}"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    if fmt == "docker-archive":   # skopeo names docker-archive layers by diff_id
        assert info["Layers"] == pushed.config_json["rootfs"]["diff_ids"]
    else:
        assert info["Layers"] == [l.digest for l in pushed.layers]
    assert info["Env"] == pushed.config_json["config"]["Env"]
    if fmt == "oci-archive":
        assert info["Digest"] == pushed.manifest_digest
        # and skopeo can copy it into a fresh OCI layout
        res = subprocess.run(["skopeo", "copy", f"oci-archive:{out}",
                              f"oci:{tmp_path / 'copy'}:1"], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr


def test_export_by_path_default_output(stored, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    layout = Path(stored.path) / ".datalad/environments/multi/image"
    res = export(stored, str(layout))
    assert res["status"] == "ok", res
    assert res["path"] == str(tmp_path / "image.tar")
    res = export(stored, "multi")
    assert res["path"] == str(tmp_path / "multi.tar")


def test_export_unknown_name(stored):
    res = export(stored, "no-such-image")
    assert res["status"] == "impossible"
    assert "neither a container" in res["message"]


def _stream_cmd(ds_path, name, cli):
    if cli:
        return ["datalad", "udocker-export", "-d", ds_path, name, "-o", "-"]
    # the Python API with its default (rendering) result renderer
    code = ("import sys, datalad.api as dl, datalad_udocker.commands.export_image;"
            "dl.Dataset(sys.argv[1]).udocker_export(sys.argv[2], output='-')")
    return [sys.executable, "-c", code, ds_path, name]


@pytest.mark.parametrize("cli", [True, False], ids=["cli", "api"])
def test_stdout_pipes_into_docker_load(stored, registry, dockerd, cli):
    pushed = registry.images["test/multi:1"]
    exporter = subprocess.Popen(_stream_cmd(stored.path, "multi", cli),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        loader = subprocess.run([dockerd.client, "--host", dockerd.host, "load"],
                                stdin=exporter.stdout, capture_output=True, env=dockerd.env,
                                timeout=300)
        exporter.stdout.close()
        err = exporter.stderr.read().decode()
        assert exporter.wait(timeout=60) == 0, err
    finally:
        stop_process(exporter)
    assert loader.returncode == 0, loader.stderr.decode() + err
    assert pushed.reference in loader.stdout.decode()
    # the result was rendered, but on stderr, not into the tar
    if cli:
        assert "udocker_export(ok)" in err
    run = dockerd.docker("run", "--rm", pushed.reference)
    dockerd.docker("rmi", pushed.reference)
    assert "version=1" in run.stdout.decode()


def test_stdout_is_exactly_the_tar(stored, tmp_path):
    out = subprocess.run(_stream_cmd(stored.path, "multi", True), capture_output=True)
    assert out.returncode == 0, out.stderr.decode()
    ref = tmp_path / "ref.tar"
    assert export(stored, "multi", output=str(ref))["status"] == "ok"
    assert out.stdout == ref.read_bytes()


def test_export_gets_missing_layers_first(stored, registry, tmp_path, dockerd):
    """A clone without layer content: export fetches the layers from the registry."""
    bare = tmp_path / "bare.git"
    subprocess.run(["git", "clone", "-q", "--bare", stored.path, str(bare)], check=True)
    subprocess.run(["git", "-C", str(bare), "fetch", "-q", stored.path, "git-annex:git-annex"],
                   check=True)
    clone = dl.clone(str(bare), tmp_path / "clone", result_renderer="disabled")
    layout = Path(clone.path) / ".datalad/environments/multi/image"
    assert not any(p.exists() for p in (layout / "blobs/sha256").iterdir() if p.is_symlink())
    out = tmp_path / "c.tar"
    res = export(clone, "multi", output=str(out))
    assert res["status"] == "ok", res
    pushed = registry.images["test/multi:1"]
    text = load_and_run(dockerd, ["-i", str(out)], pushed.reference)
    assert "version=1" in text
    assert git(clone.path, "status", "--porcelain") == ""


def test_export_fails_cleanly_when_layers_unavailable(stored, tmp_path):
    """No content and no way to get it: an error, and no partial output file."""
    clone = dl.clone(stored.path, tmp_path / "clone", result_renderer="disabled")
    subprocess.run(["git", "config", "remote.origin.annex-ignore", "true"], cwd=clone.path,
                   check=True)
    subprocess.run(["git", "annex", "dead", "udocker-registry"], cwd=clone.path,
                   capture_output=True)
    subprocess.run(["git", "config", "remote.udocker-registry.annex-ignore", "true"],
                   cwd=clone.path, check=True)
    out = tmp_path / "never.tar"
    res = export(clone, "multi", output=str(out))
    assert res["status"] == "error", res
    assert "cannot get layer content" in res["message"]
    assert not out.exists() and not list(tmp_path.glob(".never.tar*"))


def test_export_failing_midway_leaves_no_partial_output(stored, tmp_path):
    """The last layer is corrupt: the export has written the others when it fails."""
    clone = dl.clone(stored.path, tmp_path / "clone", result_renderer="disabled")
    layout = Path(clone.path) / ".datalad/environments/multi/image"
    clone.get(str(layout), result_renderer="disabled")
    index = json.loads((layout / "index.json").read_text())
    blobs = layout / "blobs" / "sha256"
    manifest = json.loads((blobs / index["manifests"][0]["digest"].split(":")[1]).read_text())
    assert len(manifest["layers"]) >= 2
    last = manifest["layers"][-1]["digest"]
    obj = Path(os.path.realpath(blobs / last.split(":")[1]))
    obj.parent.chmod(0o755)
    obj.chmod(0o644)
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 0xFF          # same size: found only by hashing while writing
    obj.write_bytes(bytes(data))
    out = tmp_path / "never.tar"
    res = export(clone, "multi", output=str(out))
    assert res["status"] == "error", res
    assert "export failed" in res["message"] and last in res["message"], res["message"]
    assert not out.exists()
    assert not list(tmp_path.glob(".never.tar*"))


def _corrupt_last_layer(clone):
    """Flip a byte in the middle of the last layer of ``multi`` (same size, mtime put
    back); returns its digest."""
    layout = Path(clone.path) / ".datalad/environments/multi/image"
    index = json.loads((layout / "index.json").read_text())
    blobs = layout / "blobs" / "sha256"
    manifest = json.loads((blobs / index["manifests"][0]["digest"].split(":")[1]).read_text())
    last = manifest["layers"][-1]["digest"]
    obj = Path(os.path.realpath(blobs / last.split(":")[1]))
    st = obj.stat()
    obj.parent.chmod(0o755)
    obj.chmod(0o644)
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 0xFF
    obj.write_bytes(bytes(data))
    obj.chmod(st.st_mode)
    os.utime(obj, ns=(st.st_atime_ns, st.st_mtime_ns))
    return last


def test_a_layer_changed_after_an_export_is_checked_again(stored, tmp_path):
    """The first export hashes every layer and remembers it (the runtime's memo); a
    second one trusts that only for unchanged files: a layer corrupted in place since,
    same size and mtime, fails the export before anything reaches stdout."""
    from datalad_udocker import config
    clone = dl.clone(stored.path, tmp_path / "clone", result_renderer="disabled")
    clone.get(".datalad/environments/multi/image", result_renderer="disabled")
    assert export(clone, "multi", output=str(tmp_path / "a.tar"))["status"] == "ok"
    memo = Path(config.udocker_dir()) / "datalad-udocker" / "verified"
    assert len(list(memo.iterdir())) >= 3
    last = _corrupt_last_layer(clone)
    out = subprocess.run(_stream_cmd(clone.path, "multi", True), capture_output=True)
    assert out.returncode != 0
    assert out.stdout == b""            # checked before the first byte
    assert last in out.stderr.decode()
    res = export(clone, "multi", output=str(tmp_path / "b.tar"))
    assert res["status"] == "error" and last in res["message"], res
    assert not (tmp_path / "b.tar").exists()
