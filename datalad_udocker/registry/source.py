"""An image in a registry, as an ImageSource the store can take."""
from .. import oci
from ..reference import parse_reference
from ..source import ImageSource, LayerSource


def source_annotations(ref, resolved):
    """Annotations recording where an image came from (in index.json)."""
    ann = {
        oci.ANNOTATION_SOURCE: str(ref),
        oci.ANNOTATION_REGISTRY: ref.registry,
        oci.ANNOTATION_REPOSITORY: ref.repository,
        oci.ANNOTATION_SOURCE_DIGEST: resolved.top.digest,
    }
    if ref.tag:
        ann[oci.ANNOTATION_TAG] = ref.tag
        ann[oci.ANNOTATION_REF_NAME] = ref.tag
    if resolved.platform:
        ann[oci.ANNOTATION_PLATFORM] = str(resolved.platform)
    return ann


def open_registry_source(text, source_ref, client_factory, platform=None):
    """The registry transport of :func:`..transports.open_image`: ``text``
    is a reference (``source_ref`` does not apply to it)."""
    ref = parse_reference(text)
    return registry_image_source(client_factory(ref), ref, platform)


def registry_image_source(client, ref, platform=None):
    """Resolve ``ref`` (a Reference) with ``client`` into an ImageSource."""
    resolved = client.resolve(ref, platform)
    layers = []
    for desc in resolved.manifest.layers:
        url = client.blob_url(ref.repository, desc.digest)

        def fetch(dest, progress, url=url, desc=desc):
            client.download_blob(url, desc.digest, desc.size, dest, progress)
        layers.append(LayerSource(desc, fetch, url))
    return ImageSource(
        manifest=resolved.manifest, config_raw=resolved.config_raw,
        layers=layers, annotations=source_annotations(ref, resolved),
        description=str(ref), default_name=ref.name)
