#!/usr/bin/env bash
# The LuaRocks build: `luarocks make --local --deps-mode=none` builds the
# bindings as C modules and installs lib/, and a stock lua5.4 can then
# require them and use the loop.  HOME points at a scratch directory so the
# user's own ~/.luarocks is not touched.
set -euo pipefail
cd "$(dirname "$0")/.."
scratch=$(mktemp -d /tmp/kengine-rock.XXXXXX)
trap 'rm -rf "$scratch"' EXIT

# every lib/ module must be listed in the rockspec
missing=0
while IFS= read -r f; do
  grep -q "\"$f\"" kengine-scm-1.rockspec || { echo "rockspec does not list $f"; missing=1; }
done < <(find lib -name '*.lua' | sort)
[ "$missing" = 0 ]

# build in a copy of the sources: luarocks compiles in place, and the
# kengine binary in the tree would clash with the kengine/ module directory
mkdir "$scratch/src"
tar --exclude=./kengine --exclude=./kengine-asan --exclude=./.git --exclude=./.rocks-test -cf - . | tar -xf - -C "$scratch/src"
cd "$scratch/src"

# Debian keeps curl's header and every library under the multiarch triplet
triplet=$(gcc -print-multiarch)
HOME=$scratch luarocks --lua-version 5.4 make --local --deps-mode=none kengine-scm-1.rockspec \
  CURL_INCDIR="/usr/include/$triplet" CURL_LIBDIR="/usr/lib/$triplet" \
  LIBSSH_LIBDIR="/usr/lib/$triplet" LIBEDIT_LIBDIR="/usr/lib/$triplet" >"$scratch/build.log" 2>&1 \
  || { cat "$scratch/build.log"; exit 1; }
eval "$(HOME=$scratch luarocks --lua-version 5.4 path --local)"
cd "$scratch"   # away from the source tree: only the installed rock counts
lua5.4 - <<'LUA'
local ssh = require "kengine.ssh"
local http = require "kengine.http"
local k = require "kengine"
assert(package.searchpath("kengine.ssh", package.cpath), "kengine.ssh is not a C module on cpath")
assert(type(ssh.connect) == "function" and type(http.request) == "function")
assert(ssh.libssh_version:match("^0%.%d+"), ssh.libssh_version)
-- the loop works from stock Lua: two tasks and a local command
local order = {}
local a = k.spawn(function() k.sleep(0.1); order[#order + 1] = "a" end)
local b = k.spawn(function() order[#order + 1] = assert(k.exec("echo b")).stdout:gsub("%s", "") end)
a:wait(); b:wait()
assert(table.concat(order) == "ba", table.concat(order))
local s, _, code = ssh.connect { host = "127.0.0.1", port = 1, user = "nobody" }
assert(s == nil and code == "ECONNREFUSED", code)
print("rock ok: stock " .. _VERSION .. " requires the kengine C modules")
LUA
