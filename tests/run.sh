#!/usr/bin/env bash
# The test command (README: `bash tests/run.sh`; CI runs it via .ci/run).
# Sets up .venv and RabbitMQ (deploy/setup.sh), then runs, stopping at the first that
# fails: ruff, import-linter (the layer contracts), mypy (strict) and pytest. Arguments
# go to pytest, e.g. `bash tests/run.sh tests/unit -x`. Exits non-zero on any failure,
# including pytest collecting no tests (its exit code 5).
set -euo pipefail
cd "$(dirname "$0")/.."

bash deploy/setup.sh
bin=.venv/bin

echo "== ruff check"
"$bin/ruff" check .
echo "== lint-imports"
"$bin/lint-imports"
echo "== mypy"
"$bin/mypy"
echo "== pytest"
status=0
"$bin/pytest" "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "error: pytest collected no tests; that counts as a failure" >&2
fi
exit "$status"
