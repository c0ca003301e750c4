#!/usr/bin/env bash
# End-to-end test of the web dashboard in headless Chromium against a live `kvtier serve`.
#
#   tests/dashboard/run.sh                 run the test (about 20 s)
#   tests/dashboard/run.sh --screenshots   also write docs/dashboard-{idle,load,unhealthy}.png
#                                          (runs the load longer, about 60 s)
#
# Installs what is missing: Debian's chromium, the npm packages of tests/dashboard (npm ci,
# playwright-core pinned in package-lock.json), the Python venv (.venv) the load driver uses, and
# the debug binary. KVTIER_BIN overrides the binary ($CARGO_TARGET_DIR/debug/kvtier by default).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ROOT=$PWD
DIR=tests/dashboard

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else "$@"; fi
}

apt_install() {
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

SCREENSHOTS=0
for arg in "$@"; do
  case "$arg" in
    --screenshots) SCREENSHOTS=1 ;;
    *) echo "usage: $0 [--screenshots]" >&2; exit 2 ;;
  esac
done

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "tests/dashboard needs Node.js >= 20 and npm (node's test runner drives playwright-core)" >&2
  exit 1
fi
NODE_MAJOR=$(node -p 'process.versions.node.split(".")[0]')
if [ "$NODE_MAJOR" -lt 20 ]; then
  echo "tests/dashboard needs Node.js >= 20 (playwright-core 1.65), found $(node --version)" >&2
  exit 1
fi

export CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
if [ ! -x "$CHROMIUM" ]; then
  echo "installing chromium (Debian package)"
  apt_install chromium fonts-dejavu-core
fi

if ! cmp -s "$DIR/package-lock.json" "$DIR/node_modules/.package-lock.installed"; then
  echo "installing npm packages of $DIR (npm ci)"
  (cd "$DIR" && npm ci --no-audit --no-fund --loglevel=error)
  cp "$DIR/package-lock.json" "$DIR/node_modules/.package-lock.installed"
fi

REQ=tests/python/requirements.txt
if [ ! -x .venv/bin/python ]; then
  if ! "${PYTHON:-python3}" -m venv .venv; then
    rm -rf .venv
    apt_install python3-venv
    "${PYTHON:-python3}" -m venv .venv
  fi
fi
if ! cmp -s "$REQ" .venv/.requirements.installed; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -r "$REQ"
  cp "$REQ" .venv/.requirements.installed
fi
export KVTIER_PYTHON="$ROOT/.venv/bin/python"

export KVTIER_BIN=${KVTIER_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/debug/kvtier}
if [ ! -x "$KVTIER_BIN" ]; then
  echo "building the debug binary"
  cargo build -p kvtier --locked
fi

if [ "$SCREENSHOTS" -eq 1 ]; then
  export DASHBOARD_SCREENSHOTS_DIR="$ROOT/docs"
  export DASHBOARD_LOAD_SECONDS=${DASHBOARD_LOAD_SECONDS:-40}
fi

cd "$DIR"
exec node --test --test-reporter=spec dashboard.test.mjs auth.test.mjs
