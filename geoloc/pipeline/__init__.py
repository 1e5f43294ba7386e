"""Data in, features out: manifests, readers, backbones, the feature store, the embed job and the loader; and
the jobs that touch files: training (``train_job``), prediction (``predict_job``), the demo (``demo_job``).

The core (``geoloc/*.py``) never imports this package; the CLI wires the two together.
"""
