#!/usr/bin/env bash
# Create the OpenHTF 1.6.3 venv that tools/bench/engine_vs_openhtf.py compares against.
#
#   bash tools/bench/setup-openhtf.sh [VENV_DIR] [--python-version X.Y | --python PATH]
#
# VENV_DIR defaults to $OPENHTF_VENV, else ${TMPDIR:-/tmp}/sequencer-bench/openhtf-1.6.3.
# It must lie outside the repository (nothing of it belongs in git). The
# interpreter defaults to CPython 3.11, the project's own minor version, so
# both sides of the benchmark run the same Python: a pyenv 3.11.x if there is
# one, else python3.11 on PATH. OpenHTF 1.6.3 needs Python >= 3.10 (it installs
# and runs on 3.10-3.13 here); the exact dependency set is pinned in
# openhtf-requirements.txt beside this script.
#
# Idempotent: an existing venv with openhtf 1.6.3 importable is left alone.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv=""
want_version="3.11"
python=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --python-version) want_version="$2"; shift 2 ;;
        --python) python="$2"; shift 2 ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        -*) echo "setup-openhtf.sh: unknown option $1" >&2; exit 2 ;;
        *) venv="$1"; shift ;;
    esac
done
venv="${venv:-${OPENHTF_VENV:-${TMPDIR:-/tmp}/sequencer-bench/openhtf-1.6.3}}"
venv_abs="$(realpath -m "$venv")"
case "$venv_abs/" in
    "$repo"/*) echo "setup-openhtf.sh: $venv_abs is inside the repository; put the venv elsewhere" >&2; exit 2 ;;
esac

if [[ -x "$venv_abs/bin/python" ]] &&
    "$venv_abs/bin/python" -c 'import importlib.metadata as m, sys; sys.exit(m.version("openhtf") != "1.6.3")' 2>/dev/null; then
    echo "OpenHTF 1.6.3 venv already in place: $venv_abs ($("$venv_abs/bin/python" -V))"
    exit 0
fi

if [[ -z "$python" ]]; then
    # pyenv's newest patch release of the wanted minor version, else PATH.
    for candidate in $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}/versions/$want_version".* 2>/dev/null | sort -V -r) ; do
        if [[ -x "$candidate/bin/python" ]]; then python="$candidate/bin/python"; break; fi
    done
fi
if [[ -z "$python" ]] && command -v "python$want_version" >/dev/null; then
    python="$(command -v "python$want_version")"
fi
if [[ -z "$python" ]]; then
    echo "setup-openhtf.sh: no Python $want_version found (pyenv or PATH); pass --python PATH (3.10-3.13)" >&2
    exit 2
fi
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
    { echo "setup-openhtf.sh: OpenHTF 1.6.3 needs Python >= 3.10, $python is $("$python" -V 2>&1)" >&2; exit 2; }

echo "creating $venv_abs with $("$python" -V) ($python)"
rm -rf "$venv_abs"
mkdir -p "$(dirname "$venv_abs")"
"$python" -m venv "$venv_abs"
"$venv_abs/bin/python" -m pip install --quiet --disable-pip-version-check -r "$here/openhtf-requirements.txt"
"$venv_abs/bin/python" - <<'EOF'
import importlib.metadata as m
import openhtf  # noqa: F401  (imports cleanly, registers its SIGINT handler, starts no server)
print("openhtf", m.version("openhtf"), "protobuf", m.version("protobuf"), "- ready")
EOF
