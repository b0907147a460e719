from shoal.modelrepo.manifest import (
    DATATYPES,
    MANIFEST_NAME,
    ImageSpec,
    Manifest,
    ManifestError,
    TensorSpec,
    list_versions,
    load_manifest,
    parse_manifest,
    resolve,
    write_manifest,
)

__all__ = [
    "DATATYPES",
    "MANIFEST_NAME",
    "ImageSpec",
    "Manifest",
    "ManifestError",
    "TensorSpec",
    "list_versions",
    "load_manifest",
    "parse_manifest",
    "resolve",
    "write_manifest",
]
