#!/usr/bin/env bash
# Builds a virtualenv pinned to upstream's uv.lock and installs a tree into it, editable.
#
#   tools/lock_venv.sh LOCK VENV TREE
#
# Every package uv sync would install here is pinned to the lock's version (tools/lock_env.py reads
# the lock); torch is the lock's if PyPI's wheel of that version installs and imports here, else
# the CPU build on this machine's disk (2.13.0), and the script says which. The venv is kept while
# the lock and these two scripts are unchanged (the key in VENV/.lock-key).
# $PYTHON runs tools/lock_env.py (it needs `packaging`); python3 creates the venv.
set -euo pipefail
lock=$1 venv=$2 tree=$3
helper=${PYTHON:-python3}
fallback_torch=2.13.0
key=$(cat "$lock" tools/lock_env.py tools/lock_venv.sh | sha256sum | cut -c1-16)
if [ "$(cat "$venv/.lock-key" 2>/dev/null)" = "$key" ]; then
    echo "$venv: up to date with $lock (key $key); $(cat "$venv/.torch-choice")"
    exit 0
fi
rm -rf "$venv"
python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check --quiet)
"$helper" tools/lock_env.py constraints "$lock" > "$venv/lock-constraints.txt"
lock_torch=$("$helper" tools/lock_env.py torch "$lock")

# Does PyPI's torch of the lock install and import here? torch's pure-Python dependencies first (at
# the lock's versions), then the wheel alone: on Linux it is a CUDA build whose several GB of
# nvidia-* libraries are its dependencies, so without them `import torch` fails. Installing them
# to find out would cost more than CI's time; the wheel alone answers whether one ships that runs.
"${pip[@]}" install --constraint "$venv/lock-constraints.txt" filelock fsspec jinja2 networkx \
    sympy typing-extensions
probe=$(mktemp -d)
if "${pip[@]}" download --no-deps --dest "$probe" "torch==$lock_torch" &&
    "${pip[@]}" install --no-deps --target "$probe/site" "$probe"/torch-*.whl &&
    PYTHONPATH="$probe/site" "$venv/bin/python" -c "import torch" 2> "$probe/import.log"; then
    choice="torch $lock_torch (the lock's, from PyPI)"
    torch_requirement="torch==$lock_torch"
else
    why=$(tail -n 1 "$probe/import.log" 2>/dev/null || true)
    choice="torch $fallback_torch (the CPU build on disk): PyPI's torch $lock_torch does not import here without its CUDA libraries (${why:-no wheel})"
    torch_requirement="torch==$fallback_torch"
fi
rm -rf "$probe"
echo "$venv: $choice"
"${pip[@]}" install "$torch_requirement"

# The tree, editable, with its dependencies and the dev and tokenizers groups, all at the lock's
# versions (pip fails if one cannot be had). hatchling builds the editable wheel.
"${pip[@]}" install --constraint "$venv/lock-constraints.txt" hatchling editables
"${pip[@]}" install --constraint "$venv/lock-constraints.txt" --no-build-isolation \
    --editable "$tree" $("$helper" tools/lock_env.py requirements "$lock")
"$venv/bin/python" -m pip check
echo "$choice" > "$venv/.torch-choice"
echo "$key" > "$venv/.lock-key"
echo "$venv: $("$helper" tools/lock_env.py show "$lock" transformers huggingface-hub tokenizers \
    safetensors accelerate jaxtyping typeguard typing-extensions beartype numpy pytest)"
