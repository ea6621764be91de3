--- service: a system service running or stopped, enabled at boot or not.
-- h:service{ name = "nginx", state = "started"|"stopped"|"restarted"|"reloaded", enabled = true|false }
-- systemd (systemctl) when PID 1 is systemd (/run/systemd/system exists), else SysV init scripts through
-- `service` and `update-rc.d` (enabled = S links in /etc/rc[2-5].d).  One round trip probes the init
-- system, whether the service exists, runs and is enabled.  restarted and reloaded are actions: they
-- always count as a change (use them in handlers); reloading a stopped service starts it.  In check mode a
-- service that does not exist yet (its package would be installed by an earlier step) is reported as a
-- change instead of a failure.
local recipe = require "kengine.recipe"
local quote = require("kengine.host").quote

local STATES = { started = true, stopped = true, restarted = true, reloaded = true }

-- systemctl is-enabled answers that count as "enabled at boot"
local SYSTEMD_ENABLED = { enabled = true, ["enabled-runtime"] = true, static = true, indirect = true,
  generated = true, alias = true }

local tail = require("kengine.host").tail

local function probe(h, p)
  local n = quote(p.name)
  local script = table.concat({
    "export LC_ALL=C",
    "if [ -d /run/systemd/system ]; then",
    "  echo systemd",
    "  systemctl show -p LoadState --value -- " .. n .. ".service 2>/dev/null | head -n 1",
    "  systemctl is-active -- " .. n .. ".service 2>/dev/null | head -n 1",
    "  systemctl is-enabled -- " .. n .. ".service 2>/dev/null | head -n 1; echo",
    "else",
    "  echo sysv",
    "  if [ -x /etc/init.d/" .. n .. " ]; then echo loaded; else echo not-found; exit 0; fi",
    -- a status action that leaves a daemon holding our pipes would hang the channel: use files
    "  o=$(mktemp) || exit 1",
    "  timeout -k 5 60 service " .. n .. " status >\"$o\" 2>&1 </dev/null; echo \"status $?\"; rm -f \"$o\"",
    "  if ls /etc/rc[2345].d/S[0-9][0-9]" .. n .. " >/dev/null 2>&1; then echo enabled; else echo disabled; fi",
    "fi",
  }, "\n")
  local r = h:raw(script)
  if r.code ~= 0 then error("cannot query service " .. p.name .. ": " .. tail(r.stderr, 3), 0) end
  local l = {}
  for line in (r.stdout .. "\n"):gmatch("([^\n]*)\n") do l[#l + 1] = line end
  local st = { init = l[1] }
  if st.init == "systemd" then
    st.exists = l[2] == "loaded"
    st.masked = l[2] == "masked"
    st.running = l[3] == "active" or l[3] == "reloading" or l[3] == "activating"
    st.enabled_state = l[4]
    st.enabled = SYSTEMD_ENABLED[l[4]] or false
  else
    st.exists = l[2] == "loaded"
    local code = tonumber((l[3] or ""):match("^status (%d+)$"))
    st.running = code == 0
    st.enabled = l[4] == "enabled"
  end
  return st
end

local function diff(h, p, st)
  if not st.exists then
    if st.masked and (p.state and p.state ~= "stopped" or p.enabled) then
      error("service " .. p.name .. " is masked (systemctl unmask it first)", 0)
    end
    if not st.masked then
      if h.check then
        return { summary = "service " .. p.name .. " not found (assuming an earlier step installs it)",
          fields = { missing = true } }
      end
      error("service " .. p.name .. " not found (" ..
        (st.init == "systemd" and "no systemd unit " .. p.name .. ".service" or "no /etc/init.d/" .. p.name) .. ")", 0)
    end
  end
  local what, fields = {}, {}
  local action
  if p.state == "started" and not st.running then
    action = "start"
  elseif p.state == "stopped" and st.running then
    action = "stop"
  elseif p.state == "restarted" then
    action = st.running and "restart" or "start"
  elseif p.state == "reloaded" then
    action = st.running and "reload" or "start"
  end
  if action then
    what[#what + 1] = action
    fields.action = action
  end
  if p.enabled ~= nil and p.enabled ~= st.enabled then
    if st.init == "systemd" and not p.enabled and st.enabled_state ~= "enabled" and st.enabled_state ~= "enabled-runtime" then
      error("service " .. p.name .. " is " .. st.enabled_state .. ": it cannot be disabled", 0)
    end
    what[#what + 1] = p.enabled and "enable" or "disable"
    fields.enabled = { st.enabled, p.enabled }
  end
  if #what == 0 then return nil end
  return { summary = table.concat(what, ", "), fields = fields, action = action }
end

-- run a command with its output in a temp file: a daemon started by an init script may keep the
-- channel's stdout/stderr open, and then the command would never look finished
-- (and bounded on the target: a hung init script fails the step, it does not lose the connection)
local function run(h, p, cmd, what)
  local script = "o=$(mktemp) || exit 1; timeout -k 5 300 sh -c " .. quote(cmd) ..
    " >\"$o\" 2>&1 </dev/null; rc=$?; cat \"$o\"; rm -f \"$o\"; exit $rc"
  local r = h:raw(script)
  if r.code ~= 0 then
    local out = tail(r.stdout ~= "" and r.stdout or r.stderr, 5)
    error("cannot " .. what .. " service " .. p.name .. " (exit " .. r.code .. ")" .. (out ~= "" and (": " .. out) or ""),
      0)
  end
end

local function apply(h, p, st, changes)
  local n = quote(p.name)
  local f = changes.fields
  if st.init == "systemd" then
    if f.enabled then run(h, p, "systemctl " .. (p.enabled and "enable" or "disable") .. " -- " .. n .. ".service",
      p.enabled and "enable" or "disable") end
    if changes.action then run(h, p, "systemctl " .. changes.action .. " -- " .. n .. ".service", changes.action) end
    return
  end
  if f.enabled then
    if p.enabled then
      -- defaults creates the links from the script's LSB header; enable turns K links back into S links
      run(h, p, "update-rc.d " .. n .. " defaults && update-rc.d " .. n .. " enable", "enable")
    else
      run(h, p, "update-rc.d " .. n .. " disable", "disable")
    end
  end
  if changes.action then
    run(h, p, "service " .. n .. " " .. changes.action, changes.action)
    if changes.action ~= "stop" and changes.action ~= "reload" then
      -- init scripts do not always report a daemon that died at once
      local r = h:raw("o=$(mktemp); timeout -k 5 60 service " .. n .. " status >\"$o\" 2>&1 </dev/null; rc=$?; " ..
        "cat \"$o\"; rm -f \"$o\"; exit $rc")
      if r.code >= 1 and r.code <= 3 then -- LSB: 1-3 dead, 4 unknown (no status action)
        error("service " .. p.name .. " is not running after " .. changes.action .. ": " .. tail(r.stdout, 3), 0)
      end
    end
  end
end

local service = recipe.resource {
  name = "service",
  description = "a service started or stopped, enabled at boot or not (systemd or SysV init)",
  label = function(p) return p.name end,
  validate = function(p)
    if type(p.name) ~= "string" or not p.name:match("^[%w@][%w@._:%-]*$") then
      return false, "name must be a service name"
    end
    if p.state ~= nil and not STATES[p.state] then
      return false, "state must be 'started', 'stopped', 'restarted' or 'reloaded'"
    end
    if p.enabled ~= nil and type(p.enabled) ~= "boolean" then return false, "enabled must be true or false" end
    if p.state == nil and p.enabled == nil then return false, "give state, enabled or both" end
    return true
  end,
  probe = probe,
  diff = diff,
  apply = apply,
}
-- `name` is the service here, not the step's display name
service.params_own = { name = true }

return service
