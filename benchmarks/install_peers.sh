#!/usr/bin/env bash
# Install the difference-imaging peers used by benchmarks/peers.py into one Python environment:
#   sfft 1.7.3 (Hu et al.; NumPy/CPU backend, built from its sdist: Cython + numba + pyFFTW)
#   properimage 0.7.2 (Sánchez et al.; ZOGY)
# plus SExtractor (Debian package source-extractor), which sfft's Easy packets run.
#
# Usage: bash benchmarks/install_peers.sh [PYTHON]    (default .venv/bin/python)
# PYTHON may name a venv interpreter that does not exist yet (DIR/bin/python): the venv is
# created with python3.11. The pins below downgrade NumPy to 2.3.5 and setuptools below 70, so
# prefer a separate environment, e.g. `bash benchmarks/install_peers.sh /tmp/venvpeers/bin/python`.
#
# Why the pins (measured on Python 3.11, Debian 12):
#   numpy==2.3.5     sfft 1.7.3 calls np.in1d, removed in NumPy 2.4 (AttributeError in its
#                    SExtractor wrapper and masking code).
#   setuptools<70, wheel, tinynpydb with --no-build-isolation
#                    tinynpydb 0.1.2's setup.py runs ez_setup, which tries to download
#                    setuptools 18 from the network inside pip's isolated build and fails;
#                    building it in the target env needs `wheel` (setuptools<70.1 has no
#                    bdist_wheel of its own).
#   the rest         the versions this recipe was tested with (pip check clean).
# Idempotent: re-running only checks. Fails loudly (set -e, explicit checks) on any error.
set -euo pipefail

PY="${1:-.venv/bin/python}"
die() { echo "install_peers.sh: $*" >&2; exit 1; }
log() { echo "install_peers.sh: $*" >&2; }
start=$SECONDS

# --- the target interpreter ----------------------------------------------------------------
if [[ ! -x "$PY" ]]; then
    case "$PY" in
        */bin/python | */bin/python3 | */bin/python3.11)
            base=$(command -v python3.11 || command -v python3) || die "no python3.11 to create $PY"
            log "creating virtual environment $(dirname "$(dirname "$PY")") with $base"
            "$base" -m venv "$(dirname "$(dirname "$PY")")"
            ;;
        *) die "$PY is not an executable Python interpreter" ;;
    esac
fi
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 needed")' \
    || die "$PY is older than Python 3.11"
PIP=("$PY" -m pip --disable-pip-version-check)
BIN_DIR=$(dirname "$PY")

# --- SExtractor (sfft's Easy packets call it as `sex` or `sextractor`) ----------------------
sextractor=$(command -v source-extractor || command -v sex || command -v sextractor || true)
if [[ -z "$sextractor" ]]; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        log "installing the Debian package source-extractor"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq source-extractor >/dev/null
    elif command -v sudo >/dev/null && command -v apt-get >/dev/null; then
        sudo apt-get update -qq
        sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq source-extractor >/dev/null
    else
        die "SExtractor not found and cannot apt-get install source-extractor: install it by hand"
    fi
    sextractor=$(command -v source-extractor) || die "source-extractor still not on PATH"
fi
# Debian names it source-extractor only; give the environment a `sex` that sfft will find.
if ! command -v sex >/dev/null && ! command -v sextractor >/dev/null && [[ ! -e "$BIN_DIR/sex" ]]; then
    ln -s "$sextractor" "$BIN_DIR/sex"
fi

# --- pins -----------------------------------------------------------------------------------
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
cat >"$constraints" <<'PINS'
numpy==2.3.5
scipy==1.17.1
astropy==8.0.2
astropy-iers-data==0.2026.11.2.0.34.55
pyerfa==2.0.1.5
PyYAML==6.0.4
packaging==26.4
sep==1.4.1
sfft==1.7.3
numba==0.68.1
llvmlite==0.50.0
pyFFTW==0.15.1
fastremap==1.21.0
properimage==0.7.2
tinynpydb==0.1.2
astroalign==2.6.2
astroscrappy==1.3.0
scikit-image==0.26.0
networkx==3.6.1
pillow==13.0.0
ImageIO==2.38.1
tifffile==2026.3.3
lazy-loader==0.6
matplotlib==3.11.2
contourpy==1.3.3
cycler==0.12.1
fonttools==4.68.0
kiwisolver==1.5.1
pyparsing==3.3.3
python-dateutil==4.0.0
joblib==1.6.0
attrs==26.1.0
cloudpickle==3.1.3
tzdata==2026.6
setuptools<70
wheel==0.48.0
PINS

have() { "$PY" -c "$1" >/dev/null 2>&1; }

# --- the install ----------------------------------------------------------------------------
"${PIP[@]}" install -q -c "$constraints" "setuptools<70" wheel
"${PIP[@]}" install -q -c "$constraints" numpy scipy astropy sep
# sfft: sdist built with build isolation (Cython, numpy headers from PyPI); NumPy backend only.
"${PIP[@]}" install -q -c "$constraints" sfft
if ! have 'import tinynpydb'; then
    "${PIP[@]}" install -q --no-build-isolation -c "$constraints" tinynpydb
fi
"${PIP[@]}" install -q -c "$constraints" properimage

# --- checks ---------------------------------------------------------------------------------
"${PIP[@]}" check >&2 || die "pip check found broken requirements"
"$PY" - <<'CHECK' || die "peer import check failed"
import numpy
assert tuple(map(int, numpy.__version__.split(".")[:2])) < (2, 4), numpy.__version__
from sfft.CustomizedPacket import Customized_Packet  # noqa: F401
from sfft.EasyCrowdedPacket import Easy_CrowdedPacket  # noqa: F401
from sfft.EasySparsePacket import Easy_SparsePacket  # noqa: F401
import properimage.operations  # noqa: F401
from importlib.metadata import version
print("peers ready:", ", ".join(f"{p} {version(p)}" for p in ("sfft", "properimage", "numpy", "numba")))
CHECK
log "SExtractor: $sextractor; done in $((SECONDS - start)) s"
