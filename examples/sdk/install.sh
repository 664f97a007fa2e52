#!/usr/bin/env bash
# Installs the official Feishu SDKs at the versions examples/sdk/ pins, into target/sdk/ (inside
# the git-ignored target/): the Node SDK with npm into target/sdk/node, the Python SDK with pip
# into a virtual environment, target/sdk/venv. tests/it/sdk.rs runs the Node and Python examples
# with them. Installs only what is missing or pinned differently; .ci/run calls it.
# Needs node + npm and python3 with venv (Debian: nodejs npm python3-venv).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dest="$here/../../target/sdk"
mkdir -p "$dest/node"

if ! cmp -s "$here/node/package.json" "$dest/node/package.json" \
    || [ ! -f "$dest/node/node_modules/@larksuiteoapi/node-sdk/package.json" ]; then
    cp "$here/node/package.json" "$dest/node/package.json"
    (cd "$dest/node" && npm install --no-audit --no-fund --loglevel=error)
fi

if [ ! -x "$dest/venv/bin/python" ]; then
    python3 -m venv "$dest/venv"
fi
if ! cmp -s "$here/python/requirements.txt" "$dest/venv/requirements.txt"; then
    "$dest/venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/python/requirements.txt"
    cp "$here/python/requirements.txt" "$dest/venv/requirements.txt"
fi

echo "examples/sdk: @larksuiteoapi/node-sdk $(node -p "require('$dest/node/node_modules/@larksuiteoapi/node-sdk/package.json').version"), lark-oapi $("$dest/venv/bin/pip" show lark-oapi | sed -n 's/^Version: //p')"
