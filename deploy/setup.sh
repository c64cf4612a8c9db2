#!/usr/bin/env bash
# Makes this checkout ready to run: a .venv with lockstep and its test tools installed
# from PyPI, and RabbitMQ running on this machine (started if installed but stopped).
# Called by the two README commands, deploy/demo.sh and tests/run.sh; safe to re-run:
# it reinstalls only when pyproject.toml changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."

python_311() {
    local candidate
    for candidate in python3.11 python3 python; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    echo "error: lockstep needs Python 3.11 or newer (python3.11 or python3 on PATH)" >&2
    return 1
}

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv" >&2
    "$(python_311)" -m venv .venv
fi

stamp=.venv/.lockstep-installed
wanted="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -x .venv/bin/lockstep ] || [ "$(cat "$stamp" 2>/dev/null || true)" != "$wanted" ]; then
    echo "setup: installing lockstep and its test tools into .venv (pip install -e '.[test]')" >&2
    if ! .venv/bin/python -m pip install --disable-pip-version-check -e '.[test]' \
        >.venv/pip-install.log 2>&1; then
        cat .venv/pip-install.log >&2
        echo "error: pip install failed (log above, also in .venv/pip-install.log)" >&2
        exit 1
    fi
    echo "$wanted" >"$stamp"
fi

if ! command -v rabbitmqctl >/dev/null 2>&1; then
    echo "error: rabbitmqctl not found; install RabbitMQ (Debian: apt-get install rabbitmq-server)" >&2
    exit 1
fi
if ! timeout 60 rabbitmqctl -q status >/dev/null 2>&1; then
    echo "setup: RabbitMQ is not running; starting it (rabbitmq-server -detached)" >&2
    rabbitmq-server -detached >/dev/null 2>&1 || true
    for _ in $(seq 1 60); do
        if timeout 60 rabbitmqctl -q await_startup >/dev/null 2>&1; then
            break
        fi
        sleep 1
    done
    if ! timeout 60 rabbitmqctl -q status >/dev/null 2>&1; then
        echo "error: RabbitMQ did not come up; see its logs (/var/log/rabbitmq/)" >&2
        exit 1
    fi
fi

# The management plugin: `lockstep broker setup|add-agent` use its HTTP API (port 15672).
# Enabling an enabled plugin changes nothing; skipped when the API already answers.
management_answers() {
    .venv/bin/python - <<'PY' 2>/dev/null
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen("http://127.0.0.1:15672/api/overview", timeout=5)
except urllib.error.HTTPError:
    pass  # 401 without credentials: the API is up
except OSError:
    sys.exit(1)
PY
}
if ! management_answers; then
    echo "setup: enabling the RabbitMQ management plugin (rabbitmq-plugins enable rabbitmq_management)" >&2
    if ! timeout 120 rabbitmq-plugins -q enable rabbitmq_management >/dev/null; then
        echo "error: rabbitmq-plugins enable rabbitmq_management failed" >&2
        exit 1
    fi
    for _ in $(seq 1 60); do
        if management_answers; then
            break
        fi
        sleep 1
    done
    if ! management_answers; then
        echo "error: the management API (http://127.0.0.1:15672/api/overview) did not answer within 60 s" >&2
        exit 1
    fi
fi
