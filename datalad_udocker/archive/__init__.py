"""Image archives: reading docker-archive / OCI layouts and archives as image
sources, and writing what ``docker load`` reads (export)."""
