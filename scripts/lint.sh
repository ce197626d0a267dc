#!/usr/bin/env bash
# ruff and mypy --strict over the three packages. mypy does not follow setuptools'
# package-dir mapping, so it checks them through a temporary hotcopy/ tree of symlinks.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
"$py" -m ruff check coordinator storage workers tests scripts
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
mkdir "$tree/hotcopy"
for pkg in coordinator storage workers; do ln -s "$PWD/$pkg" "$tree/hotcopy/$pkg"; done
MYPYPATH="$tree" "$py" -m mypy --strict --no-incremental -p hotcopy.coordinator -p hotcopy.storage -p hotcopy.workers
