#!/usr/bin/env bash
# The whole test suite: installs the project with its dev extras into .venv (made if
# missing), makes sure the database servers, pooler and file-system tools and the container engine
# the tests use are present (starting the engine when none runs), then runs
# ruff, ruff format --check, mypy, the import contracts, the docs' strict build and
# pytest. With arguments,
# pytest runs them alone, in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin:/sbin"  # mkfs.ext4, fsfreeze: system tools, not always on a user's PATH

need_packages=()
command -v redis-server >/dev/null || need_packages+=(redis-server)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null \
  || need_packages+=(postgresql)
# PostgreSQL through a pooler in transaction mode, as Kubernetes operators deploy it
command -v pgbouncer >/dev/null || need_packages+=(pgbouncer)
# the sqlalchemy backend on the MySQL family: a private MariaDB per test run
command -v mariadbd >/dev/null || need_packages+=(mariadb-server)
# the disk-fault tests make their own file systems (a loop-mounted ext4, a small tmpfs)
command -v mkfs.ext4 >/dev/null || need_packages+=(e2fsprogs)
command -v fsfreeze >/dev/null || need_packages+=(util-linux)
# the image tests: a container engine, and debootstrap for a base image when no registry
# can be reached (scripts/local-base.sh)
command -v dockerd >/dev/null || need_packages+=(docker.io)
command -v debootstrap >/dev/null || need_packages+=(debootstrap)
command -v docker-registry >/dev/null || need_packages+=(docker-registry)  # --push, tested
# the chart's alert rules: `promtool check rules` and `promtool test rules`
command -v promtool >/dev/null || need_packages+=(prometheus)
# the session browser's tests drive Debian's Chromium, headless
command -v chromium >/dev/null || need_packages+=(chromium)
if [ ${#need_packages[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing ${need_packages[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_packages[@]}"
fi
if command -v dockerd >/dev/null && ! docker info >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "starting the Docker engine (log: /tmp/dockerd.log)"
  nohup dockerd >/tmp/dockerd.log 2>&1 &
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev]'

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/mypy examples  # each example is a script of its own, not a package
.venv/bin/lint-imports  # the layers and boundaries in pyproject.toml's [tool.importlinter]
site=$(mktemp -d)  # docs/ built strictly: a broken link or anchor fails the run
.venv/bin/mkdocs build --strict --quiet --site-dir "$site" && rm -rf "$site"
if [ $# -gt 0 ]; then
  exec .venv/bin/python -m pytest "$@"
fi
# Test files are independent (each starts its own servers, names its own keys and
# schemas), so two workers run them side by side, a file per worker at a time. The
# OpenAPI property run goes on its own: its cases share one test id, which xdist merges.
properties=tests/test_openapi_properties.py
.venv/bin/python -m pytest -n "${CONVOSTORE_TEST_WORKERS:-2}" --dist loadfile --ignore "$properties"
exec .venv/bin/python -m pytest "$properties"
