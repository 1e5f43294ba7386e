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
setup: (_install "dev,ray")

# Create .venv and install what `geoloc` needs to run (no test/ray extras: the demo's set-up stays short).
setup-run: (_install "")

_install EXTRAS:
    #!/usr/bin/env bash
    set -euo pipefail
    hash=$(cat pyproject.toml justfile | sha256sum | cut -c1-16)
    name="{{EXTRAS}}"; name="${name:-run}"
    ok="{{venv}}/.geoloc-setup-$name-$hash"
    # The full install (dev,ray) also serves the run-only set-up.
    full="{{venv}}/.geoloc-setup-dev,ray-$hash"
    if [ "$name" = run ] && [ -f "$full" ]; then ok="$full"; fi
    if [ -f "$ok" ] && {{py}} -c "import geoloc" 2>/dev/null; then exit 0; fi
    [ -x "{{py}}" ] || python3 -m venv {{venv}}
    # No torch pin: pip resolves the torch/torchvision pair from the local wheel store.
    extras=""; [ "$name" = run ] || extras="[$name]"
    # pip byte-compiles file by file in one process (minutes for torch & co. on 2 cores); compileall on every
    # core does the same in ~1 min. Bytecode writing is forced on for it: where PYTHONDONTWRITEBYTECODE is
    # set, nothing would ever be cached and every process (DataLoader workers too) would recompile torch.
    {{py}} -m pip install -q --no-compile -e ".$extras"
    site=$({{py}} -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    env -u PYTHONDONTWRITEBYTECODE {{py}} -m compileall -q -j 0 "$site" > /dev/null || true
    {{py}} -c "import torchvision, open_clip, geoloc; print('geoloc', geoloc.__version__, 'ready')"
    rm -f {{venv}}/.geoloc-setup-"$name"-*; touch "{{venv}}/.geoloc-setup-$name-$hash"

# Run the whole pipeline offline on the bundled demo data (embed → train → eval → maps).
demo *ARGS: setup-run
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
