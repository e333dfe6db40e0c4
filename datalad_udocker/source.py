"""What the store needs to know about an image, whatever it came from.

A registry pull, a docker-save archive and an OCI directory all produce an
:class:`ImageSource`: the manifest and config bytes (which go to git) and,
per layer, how to get its verified bytes into a file and, where the layer
exists in a registry, the blob URL to register with git-annex.
"""
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from .oci import Descriptor, Manifest

# fetch(dest_path, progress) writes the layer's exact bytes to dest_path and
# raises DigestMismatch/UdockerError on failure; progress(n) reports n more bytes.
Fetch = Callable[[str, Callable[[int], None]], None]


@dataclass
class LayerSource:
    descriptor: Descriptor
    fetch: Fetch
    url: Optional[str] = None        # registry blob URL, None if unknown


@dataclass
class ImageSource:
    manifest: Manifest
    config_raw: bytes
    layers: List[LayerSource]
    annotations: Dict[str, str] = field(default_factory=dict)
    description: str = ""            # e.g. "127.0.0.1:5000/test/multi:1"
    default_name: str = "image"      # container name if the user gives none
    notes: List[str] = field(default_factory=list)   # e.g. unmatched layers
