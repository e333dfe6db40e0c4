#!/usr/bin/env bash
# Install everything (Debian packages + .venv) and run the main job on a built-in example.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bash "$here/tools/install.sh"
exec "$here/.venv/bin/python" "$here/tools/demo.py"
