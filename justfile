# geoloc task runner. `just setup` is idempotent: it re-installs only when pyproject.toml changed.

set shell := ["bash", "-euo", "pipefail", "-c"]

# Offline by default: the hub is never contacted (must be set before Python starts).
export HF_HUB_OFFLINE := "1"
export TRANSFORMERS_OFFLINE := "1"
export TOKENIZERS_PARALLELISM := "false"

venv := ".venv"
py := venv / "bin/python"

# List the recipes.
default:
    @just --list

# Create .venv and install geoloc with its dev and ray extras (quick when already done).
setup:
    #!/usr/bin/env bash
    set -euo pipefail
    stamp="{{venv}}/.geoloc-setup-$(cat pyproject.toml justfile | sha256sum | cut -c1-16)"
    if [ -f "$stamp" ] && {{py}} -c "import geoloc" 2>/dev/null; then exit 0; fi
    [ -x "{{py}}" ] || python3 -m venv {{venv}}
    # No torch pin: pip resolves the torch/torchvision pair from the local wheel store.
    {{py}} -m pip install -q -e ".[dev,ray]"
    {{py}} -c "import torchvision, open_clip, geoloc; print('geoloc', geoloc.__version__, 'ready')"
    rm -f {{venv}}/.geoloc-setup-*; touch "$stamp"

# Run the whole pipeline offline on the bundled demo data (embed → train → eval → maps).
demo *ARGS: setup
    {{venv}}/bin/geoloc demo {{ARGS}}

# Run the test suite (offline).
test *ARGS: setup
    {{py}} -m pytest -q {{ARGS}}

# Lint with ruff: the rules, then the formatting (line length 110, see pyproject.toml).
lint: setup
    {{venv}}/bin/ruff check .
    {{venv}}/bin/ruff format --check .

# Run every benchmark in bench/ (each prints JSON).
bench *ARGS: setup
    #!/usr/bin/env bash
    set -euo pipefail
    for b in bench/bench_*.py; do echo "== $b"; {{py}} "$b" {{ARGS}}; done
