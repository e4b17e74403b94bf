#!/usr/bin/env bash
# Creates tests/reference/.venv with the pinned set in tests/reference/requirements.txt.
# Idempotent: an existing venv is reused; pip only installs what is missing or differs.
# Needs Python 3.11 (the pins were resolved there; override with PYTHON=...) and access to PyPI.
# Size: about 3.3 GB downloaded, 6.9 GB installed (torch's PyPI wheel pulls nvidia-* libraries).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv"
req="$here/requirements.txt"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    echo "setup.sh: creating $venv with $("$python" --version 2>&1)" >&2
    "$python" -m venv "$venv"
fi

if "$venv/bin/python" - "$req" <<'PY'
import sys
from importlib.metadata import version, PackageNotFoundError
want = {}
for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if line:
        name, ver = line.split("==")
        want[name] = ver
for name, ver in want.items():
    try:
        if version(name) != ver:
            sys.exit(1)
    except PackageNotFoundError:
        sys.exit(1)
PY
then
    echo "setup.sh: $venv already matches requirements.txt" >&2
    exit 0
fi

# Low priority: this is a large install and other builds may share the machine.
nice -n 19 "$venv/bin/python" -m pip install --disable-pip-version-check -r "$req"
"$venv/bin/python" -c 'import torch, transformers, gguf; print("setup.sh: torch", torch.__version__, "transformers", transformers.__version__, "gguf ok")'
