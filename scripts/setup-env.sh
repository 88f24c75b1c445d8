#!/usr/bin/env bash
# Create .venv (if missing) and install the project with its dev extra. Idempotent: a stamp file
# records the pyproject.toml it installed, so a second run does nothing unless that file changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
stamp="$VENV/.cascade-clip-installed"
want=$(sha256sum pyproject.toml scripts/setup-env.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch + torchvision first, as these machines need (see README "Installation"): the pairs below
# install from the machine's local copies; PyPI's torchvision does not import beside other builds.
case "$(uname -m)" in
  aarch64|arm64) "$VENV/bin/python" -m pip install -q torch==2.9.1 torchvision==0.24.1 ;;
  *)             "$VENV/bin/python" -m pip install -q torch==2.14.1 torchvision==0.29.1 ;;
esac
"$VENV/bin/python" -m pip install -q -e '.[dev]'
echo "$want" > "$stamp"
