"""Test-wide settings: offline hub access must be set before huggingface_hub is first imported."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Property tests explore the same examples on every run, so CI never fails on a newly drawn edge case;
# run with `--hypothesis-profile=explore` to search fresh examples.
from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None)
settings.register_profile("explore", deadline=None)
settings.load_profile("ci")
