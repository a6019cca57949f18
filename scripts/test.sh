#!/usr/bin/env bash
# The whole test suite: installs the project with its dev extras into .venv (made if
# missing), makes sure the database binaries the tests start are present, then runs
# ruff, ruff format --check, mypy and pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

need_packages=()
command -v redis-server >/dev/null || need_packages+=(redis-server)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null \
  || need_packages+=(postgresql)
if [ ${#need_packages[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing ${need_packages[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_packages[@]}"
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev]'

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
