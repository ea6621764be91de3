--- package: Debian packages through apt.
-- h:package{ name = "jq" or { "jq", "tree", "nginx=1.22.1-9", "libc6:i386" },
--            state = "present"|"absent"|"latest", purge = false (absent: also remove config files),
--            update_cache = false, cache_valid_time = seconds (update only when the lists are older),
--            install_recommends = nil (apt's own setting) | true | false, lock_timeout = 300 }
-- One round trip probes every package (dpkg-query, apt-cache policy) and the age of the apt lists.
-- apt runs noninteractively, keeps changed config files (--force-confdef/--force-confold) and waits for
-- the dpkg lock (DPkg::Lock::Timeout; `apt-get update` is retried while its lists lock is busy).
-- Updating the cache is never a change by itself, and never happens in check mode.  It also happens
-- without update_cache when an apt_repository step changed the sources since the last update.
local recipe = require "kengine.recipe"
local quote = require("kengine.host").quote

-- kengine's own state on the target: when it last updated the lists, and a marker that
-- apt_repository leaves when it changed the sources (the lists are stale whatever their age)
local STAMP = "/var/lib/kengine/apt-update-stamp"
local NEEDED = "/var/lib/kengine/apt-update-needed"

local ENV = "DEBIAN_FRONTEND=noninteractive NEEDRESTART_MODE=a APT_LISTCHANGES_FRONTEND=none LC_ALL=C"

local function names_of(p)
  return type(p.name) == "table" and p.name or { p.name }
end

-- "nginx:amd64=1.22" -> base "nginx", arch "amd64", version "1.22"
local function parse_name(n)
  local rest, version = n:match("^([^=]+)=(.+)$")
  rest = rest or n
  local base, arch = rest:match("^([^:]+):(.+)$")
  return { spec = n, base = base or rest, arch = arch, version = version,
    query = rest } -- dpkg-query / apt-cache name (with the arch, without the version)
end

local function tail_lines(text, n, pattern)
  local lines = {}
  for l in (text or ""):gmatch("[^\n]+") do
    if not pattern or l:find(pattern) then lines[#lines + 1] = l end
  end
  local first = math.max(1, #lines - n + 1)
  return table.concat(lines, "\n", first)
end

local function probe(h, p)
  local pkgs = {}
  for i, n in ipairs(names_of(p)) do pkgs[i] = parse_name(n) end
  local queries = {}
  for i, pk in ipairs(pkgs) do queries[i] = quote(pk.query) end
  local q = table.concat(queries, " ")
  local script = table.concat({
    "export LC_ALL=C",
    "echo @@dpkg",
    "dpkg-query -W -f='${Package}\\t${Architecture}\\t${Status}\\t${Version}\\n' " .. q .. " 2>/dev/null",
    "echo @@policy",
    "apt-cache policy " .. q .. " 2>/dev/null",
    "echo @@cache",
    "date +%s",
    "stat -c %Y " .. STAMP .. " 2>/dev/null || echo 0",
    "if [ -e " .. NEEDED .. " ]; then echo needed; else echo -; fi",
    "ls /var/lib/apt/lists 2>/dev/null | grep -c '_Packages' || true",
    "stat -c %Y /var/lib/apt/lists/*Release 2>/dev/null | sort -n | tail -n 1",
    "echo @@end",
  }, "\n")
  local r = h:raw(script)
  if r.code ~= 0 or not r.stdout:find("@@end", 1, true) then
    error("cannot query dpkg/apt: " .. tail_lines(r.stderr, 3), 0)
  end
  local out = r.stdout
  local dpkg_text = out:match("@@dpkg\n(.-)@@policy\n") or ""
  local policy_text = out:match("@@policy\n(.-)@@cache\n") or ""
  local cache_text = out:match("@@cache\n(.-)@@end") or ""

  -- installed instances: base -> list of {arch, status, version}
  local inst = {}
  for pkg, arch, status, version in dpkg_text:gmatch("([^\t\n]+)\t([^\t\n]*)\t([^\t\n]*)\t([^\t\n]*)\n") do
    inst[pkg] = inst[pkg] or {}
    local word = status:match("(%S+)$") or ""
    table.insert(inst[pkg], { arch = arch, version = version,
      installed = word == "installed" or word:match("^triggers%-") ~= nil,
      config_files = word == "config-files" })
  end

  -- apt-cache policy blocks: "name:\n  Installed: X\n  Candidate: Y"
  local policy = {}
  local cur
  for l in policy_text:gmatch("[^\n]*") do
    local head = l:match("^(%S+):$")
    if head then
      cur = {}
      policy[head] = cur
    elseif cur then
      local c = l:match("^%s+Candidate:%s*(%S+)")
      if c then cur.candidate = c ~= "(none)" and c or nil end
    end
  end

  local c = {}
  for l in cache_text:gmatch("[^\n]+") do c[#c + 1] = l end
  local now, stamp = tonumber(c[1]) or 0, tonumber(c[2]) or 0
  local lists = tonumber(c[4]) or 0
  local newest = math.max(stamp, tonumber(c[5]) or 0)
  local cache = { empty = lists == 0, age = now - newest, needed = c[3] == "needed" }

  for _, pk in ipairs(pkgs) do
    local found
    for _, i in ipairs(inst[pk.base] or {}) do
      if not pk.arch or pk.arch == i.arch then
        if i.installed then found = i; break end
        if i.config_files then pk.config_files = true end
      end
    end
    pk.installed = found ~= nil
    pk.version_installed = found and found.version
    local pol = policy[pk.query] or policy[pk.base]
    pk.candidate = pol and pol.candidate
    pk.known = pk.installed or pk.candidate ~= nil
  end
  return { pkgs = pkgs, cache = cache }
end

-- does this step update the cache before installing?
local function update_due(h, p, cache)
  if cache.needed or h.apt_sources_changed then return true end
  if not p.update_cache then return false end
  if cache.empty or not p.cache_valid_time then return true end
  return cache.age > p.cache_valid_time
end

local function unknown_error(h, names, cache)
  local msg = "unknown package" .. (#names > 1 and "s" or "") .. ": " .. table.concat(names, ", ") ..
    " (no installation candidate in the apt cache)"
  if cache and cache.empty then msg = msg .. "; the apt cache is empty: set update_cache = true" end
  -- a repository whose lists failed to download (bad key, unreachable) is only a warning to apt-get update
  if h.apt_update_warnings then msg = msg .. "; apt-get update warned:\n" .. h.apt_update_warnings end
  return msg
end

-- what to do, given a probed state.  pending: a cache update will run before the change.
local function plan(h, p, st, pending)
  local install, remove, unknown, before, after = {}, {}, {}, {}, {}
  local fresh, upgrade = {}, {}  -- install split for the summary: new packages, other versions
  local unverified = false
  for _, pk in ipairs(st.pkgs) do
    local now = pk.installed and (pk.base .. " " .. pk.version_installed) or (pk.base .. ": not installed")
    if p.state == "absent" then
      if pk.installed or (p.purge and pk.config_files) then
        remove[#remove + 1] = pk.query
        before[#before + 1] = now
        after[#after + 1] = pk.base .. ": " .. (p.purge and "purged" or "removed")
      end
    else
      local want
      if not pk.known then
        if pending then
          unverified = true
          want = true
        else
          unknown[#unknown + 1] = pk.spec
        end
      elseif not pk.installed then
        want = true
      elseif pk.version and pk.version ~= pk.version_installed then
        want = true
      elseif p.state == "latest" and pk.candidate and pk.candidate ~= pk.version_installed then
        want = true
      end
      if want then
        install[#install + 1] = pk.spec
        if pk.installed then
          upgrade[#upgrade + 1] = pk.spec .. " (" .. pk.version_installed .. " → " ..
            (pk.version or pk.candidate) .. ")"
        else
          fresh[#fresh + 1] = pk.spec
        end
        before[#before + 1] = now
        after[#after + 1] = pk.base .. " " .. (pk.version or pk.candidate or "(after the cache update)")
      end
    end
  end
  if #unknown > 0 then error(unknown_error(h, unknown, st.cache), 0) end
  if #install == 0 and #remove == 0 then return nil end
  local what = {}
  if #fresh > 0 then what[#what + 1] = "install " .. table.concat(fresh, ", ") end
  if #upgrade > 0 then what[#what + 1] = "upgrade " .. table.concat(upgrade, ", ") end
  if #remove > 0 then what[#what + 1] = (p.purge and "purge " or "remove ") .. table.concat(remove, ", ") end
  local summary = table.concat(what, "; ")
  if unverified and h.check then summary = summary .. " (apt cache not updated in check mode)" end
  return { summary = summary, before = table.concat(before, "\n") .. "\n", after = table.concat(after, "\n") .. "\n",
    name = "packages", fields = { install = #install > 0 and install or nil, remove = #remove > 0 and remove or nil },
    install = install, remove = remove }
end

local function diff(h, p, st)
  local due = update_due(h, p, st.cache)
  local changes = plan(h, p, st, due and p.state ~= "absent")
  if changes then
    changes.update = due and p.state ~= "absent"
    if changes.update then changes.fields.update_cache = true end
    return changes
  end
  -- nothing to install: the cache is still updated (in a normal run), which is not a change
  if due and p.state ~= "absent" and not h.check then
    return { summary = "update the apt cache", update = true, fields = { update_cache = true }, install = {},
      remove = {} }
  end
  return nil
end

local function apt_update(h, p)
  local script = table.concat({
    "export " .. ENV,
    "end=$(( $(date +%s) + " .. math.tointeger(p.lock_timeout) .. " ))",
    "while :; do",
    "  out=$(apt-get update -q 2>&1 </dev/null); rc=$?",
    "  [ $rc -eq 0 ] && break",
    "  case \"$out\" in *'Could not get lock'*|*'Unable to lock'*)",
    "    if [ \"$(date +%s)\" -lt \"$end\" ]; then sleep 2; continue; fi;; esac",
    "  printf '%s\\n' \"$out\" >&2; exit $rc",
    "done",
    "printf '%s\\n' \"$out\"",
    "mkdir -p /var/lib/kengine && touch " .. STAMP .. " && rm -f " .. NEEDED,
  }, "\n")
  local r = h:raw(script)
  if r.code ~= 0 then
    local err = tail_lines(r.stderr, 5, "^[EW]:")
    if err == "" then err = tail_lines(r.stderr, 5) end
    error("apt-get update failed (exit " .. r.code .. "): " .. err, 0)
  end
  h.apt_sources_changed = nil
  local warnings = tail_lines(r.stdout, 5, "^W:")
  h.apt_update_warnings = warnings ~= "" and warnings or nil
end

local function apt_get(h, p, action, names)
  local args = { "apt-get", action, "-y", "-q", "-o", "DPkg::Lock::Timeout=" .. math.tointeger(p.lock_timeout),
    "-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold" }
  if action == "install" and p.install_recommends ~= nil then
    args[#args + 1] = p.install_recommends and "--install-recommends" or "--no-install-recommends"
  end
  for _, n in ipairs(names) do
    -- a pinned version is explicit: going down to it is what was asked
    if action == "install" and n:find("=", 1, true) then args[#args + 1] = "--allow-downgrades"; break end
  end
  args[#args + 1] = "--"
  for _, n in ipairs(names) do args[#args + 1] = n end
  for i, a in ipairs(args) do args[i] = quote(a) end
  local r = h:raw("export " .. ENV .. "; " .. table.concat(args, " ") .. " </dev/null")
  if r.code ~= 0 then
    local missing = {}
    for n in r.stderr:gmatch("E: Unable to locate package ([^\n]+)") do missing[#missing + 1] = n end
    if #missing > 0 then error(unknown_error(h, missing), 0) end
    local err = tail_lines(r.stderr, 5, "^E:")
    if err == "" then err = tail_lines(r.stderr ~= "" and r.stderr or r.stdout, 5) end
    error("apt-get " .. action .. " " .. table.concat(names, " ") .. " failed (exit " .. r.code .. "): " .. err, 0)
  end
end

local package = recipe.resource {
  name = "package",
  description = "Debian packages installed, at their latest version, or removed (apt)",
  defaults = { state = "present", lock_timeout = 300 },
  label = function(p) return table.concat(names_of(p), ", ") end,
  validate = function(p)
    local names = names_of(p)
    if type(p.name) ~= "string" and type(p.name) ~= "table" then
      return false, "name must be a package name or a list of names"
    end
    if #names == 0 then return false, "name: no packages given" end
    for _, n in ipairs(names) do
      if type(n) ~= "string" or not n:match("^[%w][%w+.%-]*$") and not n:match("^[%w][%w+.%-]*:[%w%-]+$")
        and not n:match("^[%w][%w+.%-]*=[%w.+~:%-]+$") and not n:match("^[%w][%w+.%-]*:[%w%-]+=[%w.+~:%-]+$") then
        return false, "invalid package name '" .. tostring(n) .. "'"
      end
    end
    if p.state ~= "present" and p.state ~= "absent" and p.state ~= "latest" then
      return false, "state must be 'present', 'absent' or 'latest'"
    end
    if p.state == "latest" then
      for _, n in ipairs(names) do
        if n:find("=", 1, true) then return false, "state 'latest' cannot pin a version ('" .. n .. "')" end
      end
    end
    if p.cache_valid_time ~= nil and (type(p.cache_valid_time) ~= "number" or p.cache_valid_time < 0) then
      return false, "cache_valid_time must be a number of seconds"
    end
    if type(p.lock_timeout) ~= "number" or p.lock_timeout < 0 or not math.tointeger(p.lock_timeout) then
      return false, "lock_timeout must be a whole number of seconds"
    end
    return true
  end,

  probe = probe,
  diff = diff,

  apply = function(h, p, _, changes)
    if changes.update then
      apt_update(h, p)
      -- the candidates may have changed: plan again on the fresh cache
      changes = plan(h, p, probe(h, p), false)
      if not changes then return { changed = false, msg = "apt cache updated" } end
    end
    if #changes.install > 0 then apt_get(h, p, "install", changes.install) end
    if #changes.remove > 0 then apt_get(h, p, p.purge and "purge" or "remove", changes.remove) end
    return { msg = changes.summary, changes = changes.fields, diff_before = changes.before,
      diff_after = changes.after }
  end,
}
-- `name` is the package list here, not the step's display name
package.params_own = { name = true }

return package
