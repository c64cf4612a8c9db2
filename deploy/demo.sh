#!/usr/bin/env bash
# The demo command (README: `bash deploy/demo.sh`): sets up .venv and RabbitMQ
# (deploy/setup.sh), then runs deploy/demo/run.py, which starts a coordinator, three
# agents and two dependent services on this machine and tells what happens.
set -euo pipefail
cd "$(dirname "$0")/.."

bash deploy/setup.sh
exec .venv/bin/python deploy/demo/run.py "$@"
