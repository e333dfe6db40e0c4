"""Property-based tests and a short bounded fuzz of the pure parsers (hypothesis).

Any input to the reference, descriptor, manifest/index and config parsers ends in a parsed value
or a clean ``UdockerError``, never another exception; valid references round-trip; a parsed
descriptor's digest and size are always valid; a password typed into a reference is never echoed.
"""
import json

from hypothesis import HealthCheck, given, settings, strategies as st

from datalad_udocker import oci
from datalad_udocker.digest import DIGEST_RE, MAX_BLOB_SIZE
from datalad_udocker.errors import InvalidReference, UdockerError
from datalad_udocker.reference import parse_reference

FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])

# -- references --------------------------------------------------------------------------------
# (a first component with a "." would be a registry host, as in Docker: dots only further on)
component = st.from_regex(r"\A[a-z0-9]{1,8}(?:(?:_|__|-{1,2})[a-z0-9]{1,8}){0,2}\Z")
dotted = st.from_regex(r"\A[a-z0-9]{1,8}(?:(?:[._]|__|-{1,2})[a-z0-9]{1,8}){0,2}\Z")
hostname = st.from_regex(r"\A[a-z0-9]{1,10}(?:\.[a-z0-9]{1,10}){0,2}\Z")
tags = st.from_regex(r"\A\w[\w.-]{0,20}\Z", alphabet=st.characters(max_codepoint=127))
hexdigest = st.binary(min_size=32, max_size=32).map(lambda b: "sha256:" + b.hex())


@st.composite
def valid_references(draw):
    host = draw(st.one_of(
        st.none(), hostname.map(lambda h: h + ".lan"),
        st.tuples(hostname, st.integers(1, 65535)).map(lambda t: "%s:%d" % t),
        st.just("localhost"), st.just("[::1]:5000")))
    repo = "/".join([draw(component)] + draw(st.lists(dotted, max_size=2)))
    tag = draw(st.one_of(st.none(), tags))
    digest = draw(st.one_of(st.none(), hexdigest))
    text = (host + "/" if host else "") + repo
    text += (":" + tag if tag else "") + ("@" + digest if digest else "")
    return text


@FUZZ
@given(valid_references())
def test_valid_references_round_trip(text):
    parsed = parse_reference(text)
    assert parse_reference(str(parsed)) == parsed
    assert parsed.reference in (parsed.digest, parsed.tag)


@FUZZ
@given(st.one_of(st.text(max_size=80),
                 st.text(alphabet="abc:/@.-_AZ09[]sha256", max_size=60),
                 valid_references().map(lambda t: t + "@x"),
                 st.builds(lambda a, b: a + "@" + b, st.text(max_size=20), valid_references())))
def test_any_text_parses_or_raises_invalid_reference(text):
    try:
        parse_reference(text)
    except InvalidReference as exc:
        assert "\n" not in str(exc)


password = st.text(alphabet="ABCDEFGHJKabcdefgh0123456789!$%&*+;=~", min_size=10,
                   max_size=20).map(lambda p: "PW" + p)


@FUZZ
@given(st.text(alphabet="abcxyz", min_size=1, max_size=8), password, valid_references(),
       st.sampled_from(["", "docker://", "https://"]))
def test_password_in_reference_is_refused_and_never_echoed(user, pw, valid, scheme):
    text = "%s%s:%s@%s" % (scheme, user, pw, valid)
    try:
        parse_reference(text)
    except InvalidReference as exc:
        assert pw not in str(exc), str(exc)
    else:
        raise AssertionError("a reference with a password was accepted: " + text)


# -- descriptors -------------------------------------------------------------------------------
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                         st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)
digest_like = st.one_of(hexdigest, st.text(max_size=80), st.just("sha256:../../x?y="),
                        hexdigest.map(str.upper), hexdigest.map(lambda d: d + "\n"),
                        st.binary(min_size=64, max_size=64).map(lambda b: "sha512:" + b.hex()))
size_like = st.one_of(st.integers(min_value=-10, max_value=1 << 70), st.booleans(), st.floats(),
                      st.text(max_size=5), st.none())
descriptor_dicts = st.fixed_dictionaries(
    {}, optional={"mediaType": st.one_of(st.sampled_from(list(oci.LAYER_TYPES)), json_values),
                  "digest": digest_like, "size": size_like,
                  "platform": st.one_of(json_values, st.fixed_dictionaries(
                      {"os": st.text(max_size=5), "architecture": json_scalars})),
                  "annotations": json_values, "urls": json_values})


@FUZZ
@given(st.one_of(descriptor_dicts, json_values))
def test_descriptor_parses_valid_or_raises_udocker_error(d):
    try:
        desc = oci.Descriptor.from_dict(d)
    except UdockerError as exc:
        assert "\n" not in str(exc)
        return
    assert DIGEST_RE.match(desc.digest)
    assert type(desc.size) is int and 0 <= desc.size <= MAX_BLOB_SIZE
    assert isinstance(desc.media_type, str)


# -- a short, bounded fuzz of the manifest, index and config parsers -----------------------------
def _valid_manifest():
    layer = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
             "digest": "sha256:" + "1" * 64, "size": 10}
    return {"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
            "config": {"mediaType": oci.OCI_CONFIG, "digest": "sha256:" + "2" * 64, "size": 5},
            "layers": [layer, dict(layer)]}


def _valid_index():
    return {"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": [
        {"mediaType": oci.OCI_MANIFEST, "digest": "sha256:" + "3" * 64, "size": 7,
         "platform": {"os": "linux", "architecture": "amd64"}}]}


def _valid_config():
    return {"os": "linux", "architecture": "amd64",
            "config": {"Env": ["A=1"], "Cmd": ["sh"], "WorkingDir": "/"},
            "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "4" * 64]}}


def _paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, prefix + (i,))


def _replace(doc, path, value):
    if not path:
        return value
    doc = json.loads(json.dumps(doc))
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


nasty = st.one_of(json_values, st.sampled_from([
    float("nan"), float("inf"), -float("inf"), 10 ** 400, -(10 ** 30), 1e308, [], {}, "",
    "sha256:../../x?y=", True]))


@st.composite
def mutated_documents(draw):
    base = draw(st.sampled_from([_valid_manifest, _valid_index, _valid_config]))()
    paths = list(_paths(base))
    for _ in range(draw(st.integers(1, 3))):
        base = _replace(base, draw(st.sampled_from(paths)), draw(nasty))
        paths = list(_paths(base))
    return json.dumps(base, allow_nan=True).encode()


def deep(n):
    return ("[" * n + "]" * n).encode()


EXTREMES = [deep(100_000), b'{"a":' * 50_000 + b"1" + b"}" * 50_000, b"1" * 10_000,
            b'{"layers": [], "config": {"digest": "sha256:' + b"a" * 64 + b'", "size": '
            + b"9" * 5000 + b"}}", b"NaN", b'{"size": Infinity}', b"\xff\xfe", b"", b"null",
            b'{"mediaType": 5}', b'{"manifests": 5}', b'{"manifests": [5]}',
            b'{"rootfs": {"diff_ids": "sha256:x"}}', b'{"rootfs": []}']


def _parse_all(raw):
    for parse in (oci.parse_manifest, oci.parse_config):
        try:
            parse(raw)
        except UdockerError as exc:
            assert "\n" not in str(exc)


def test_extreme_json_is_refused_cleanly():
    for raw in EXTREMES:
        _parse_all(raw)


@FUZZ
@given(st.one_of(mutated_documents(), st.binary(max_size=200),
                 json_values.map(lambda v: json.dumps(v, allow_nan=True).encode())))
def test_fuzz_manifest_index_config_parsers(raw):
    _parse_all(raw)


def test_valid_documents_still_parse():
    m = oci.parse_manifest(json.dumps(_valid_manifest()).encode())
    assert isinstance(m, oci.Manifest) and len(m.layers) == 2
    assert isinstance(oci.parse_manifest(json.dumps(_valid_index()).encode()), oci.Index)
    cfg = oci.parse_config(json.dumps(_valid_config()).encode())
    assert cfg.diff_ids == ("sha256:" + "4" * 64,) and str(cfg.platform) == "linux/amd64"
