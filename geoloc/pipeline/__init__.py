"""Data in, features out: manifests, readers, backbones, the feature store, the embed job and the loader.

The core (``geoloc/*.py``) never imports this package; the CLI wires the two together.
"""
