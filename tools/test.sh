#!/usr/bin/env bash
# Run the test suite: installs what is missing (system packages, .venv),
# then runs pytest.  Extra arguments go to pytest.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bash "$here/tools/install.sh"
cd "$here"
export PATH="$here/.venv/bin:$PATH"
exec "$here/.venv/bin/python" -m pytest tests "$@"
