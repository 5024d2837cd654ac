#!/usr/bin/env bash
# Create a virtual environment and install odedit-hf (editable) with its dev extras.
# Where no NVIDIA GPU is present, a CPU build of torch is installed first so pip does not pull
# several GB of CUDA wheels: from a local wheel folder if one exists (ODEDIT_TORCH_WHEELS, default
# /opt/wheels), else from the index pip is configured with, plus ODEDIT_TORCH_INDEX_URL when set (e.g. a
# CPU-only torch wheel index). No index is named here: pip's own configuration chooses it.
set -euo pipefail
PY=${1:-python3}
VENV=${2:-.venv}
TORCH_VERSION=${ODEDIT_TORCH_VERSION:-2.13.0}
WHEELS=${ODEDIT_TORCH_WHEELS:-/opt/wheels}

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
"${PIP[@]}" --upgrade pip

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
        echo "[bootstrap] NVIDIA GPU found: installing torch from PyPI"
        "${PIP[@]}" "torch==${TORCH_VERSION}"
    elif ls "$WHEELS"/torch-"${TORCH_VERSION}"*cpu*.whl >/dev/null 2>&1; then
        echo "[bootstrap] no GPU: installing CPU torch ${TORCH_VERSION} from $WHEELS"
        "${PIP[@]}" --find-links "$WHEELS" "torch==${TORCH_VERSION}"
    elif [ -n "${ODEDIT_TORCH_INDEX_URL:-}" ]; then
        echo "[bootstrap] no GPU: installing torch ${TORCH_VERSION} with the extra index ODEDIT_TORCH_INDEX_URL"
        "${PIP[@]}" --extra-index-url "$ODEDIT_TORCH_INDEX_URL" "torch==${TORCH_VERSION}"
    else
        echo "[bootstrap] no GPU: installing torch ${TORCH_VERSION} from pip's configured index" \
            "(set ODEDIT_TORCH_INDEX_URL to a CPU wheel index to avoid the CUDA build)"
        "${PIP[@]}" "torch==${TORCH_VERSION}"
    fi
fi
echo "[bootstrap] installing odedit-hf (editable) with dev extras"
"${PIP[@]}" -e ".[dev]"
echo "[bootstrap] done: $VENV"
