#!/usr/bin/env bash
# Print the rockspec's Lua module lines for every file under lib/ (paste them
# into kengine-scm-1.rockspec; tests/rock.sh fails when one is missing).
cd "$(dirname "$0")/.."
find lib -name '*.lua' | sort | while read -r f; do
  m=${f#lib/}; m=${m%.lua}; m=${m%/init}; m=${m//\//.}
  printf '    ["%s"] = "%s",\n' "$m" "$f"
done
