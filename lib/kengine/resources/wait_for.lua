--- wait_for: wait until a port is open, a URL answers with a status, or a command succeeds.
-- h:wait_for{ port = 8080, host = "127.0.0.1", state = "started"|"stopped" }   -- TCP, checked from the target
-- h:wait_for{ url = "http://127.0.0.1:8080/health", status = 200 (or { 200, 204 }), insecure = false }
-- h:wait_for{ command = "test -s /var/run/app.pid" }                             -- sh on the target
-- with timeout = 60 and interval = 1 (seconds), plus the usual step options (name, tags, ignore_errors,
-- sudo …).  Each attempt is one round trip, itself bounded by the time left; attempts stop at the
-- timeout.  The step is read-only, so it also runs in check mode; it is "ok" when the condition holds
-- (never "changed") and "failed" with what the last attempt saw when it times out.
-- The port check uses bash's /dev/tcp, the URL check curl: both are on a minimal Debian.
local hostmod = require "kengine.host"
local secret = require "kengine.secret"
local k_core = require "kengine.core"

local Host, quote, STEP_OPTS = hostmod.Host, hostmod.quote, hostmod.STEP_OPTS

local M = {}

local PARAMS = { port = true, host = true, state = true, url = true, status = true, insecure = true,
  command = true, timeout = true, interval = true, headers = true }

local tail = require("kengine.host").tail

local function conf(key, value)
  return key .. " = \"" .. secret.reveal(value):gsub("[\\\"]", "\\%0"):gsub("\n", "\\n") .. "\"\n"
end

local function seconds(x) return string.format("%d", math.max(1, math.ceil(x))) end

-- one attempt for each kind: returns ok, what was seen
local checks = {}

function checks.port(h, p, budget)
  local r = h:raw("timeout " .. seconds(budget) .. " bash -c " ..
    quote(": </dev/tcp/" .. p.host .. "/" .. math.tointeger(p.port)) .. " 2>/dev/null")
  local open = r.code == 0
  if p.state == "stopped" then return not open, open and "still open" or "closed" end
  return open, open and "open" or (r.code == 124 and "connect timed out" or "connection refused")
end

function checks.url(h, p, budget)
  local c = { conf("url", p.url) }
  local names = {}
  for key in pairs(p.headers or {}) do names[#names + 1] = key end
  table.sort(names)
  for _, key in ipairs(names) do c[#c + 1] = conf("header", key .. ": " .. secret.reveal(p.headers[key])) end
  local r = h:raw("curl -s -o /dev/null -w '%{http_code}' --max-time " .. seconds(budget) ..
    (p.insecure and " -k" or "") .. " -K -", { stdin = table.concat(c) })
  local code = tonumber(r.stdout:match("%d+")) or 0
  for _, want in ipairs(p.statuses) do
    if code == want then return true, "status " .. code end
  end
  if code == 0 then
    if r.code == 127 then error("curl is not installed on " .. h.name, 0) end
    return false, "no response (curl exit " .. r.code .. ")"
  end
  return false, "status " .. code
end

function checks.command(h, p, budget)
  local cmd = "timeout -k 2 " .. seconds(budget) .. " sh -c " .. quote(secret.reveal(p.command))
  if secret.is(p.command) then cmd = secret.new(cmd) end
  local r = h:raw(cmd)
  if r.code == 0 then return true, "exit status 0" end
  local err = tail(r.stderr, 3)
  return false, (r.code == 124 and "timed out" or ("exit status " .. r.code)) .. (err ~= "" and (": " .. err) or "")
end

local function label_of(p)
  if p.port then return "port " .. p.host .. ":" .. math.tointeger(p.port) .. (p.state == "stopped" and " closed" or "") end
  if p.url then return "url " .. (secret.is(p.url) and "***" or p.url) end
  local shown = secret.redact(secret.reveal(p.command))
  return "command " .. (#shown > 50 and (shown:sub(1, 47) .. "...") or shown)
end

local function validate(p)
  local kinds = (p.port and 1 or 0) + (p.url and 1 or 0) + (p.command and 1 or 0)
  if kinds ~= 1 then return false, "give exactly one of port, url or command" end
  if p.port and (not math.tointeger(p.port) or p.port < 1 or p.port > 65535) then
    return false, "port must be a number from 1 to 65535"
  end
  if p.port and (type(p.host) ~= "string" or not p.host:match("^[%w.:%-]+$")) then
    return false, "host must be a host name or address"
  end
  if p.state ~= "started" and p.state ~= "stopped" then return false, "state must be 'started' or 'stopped'" end
  if p.state == "stopped" and not p.port then return false, "state = 'stopped' is for ports" end
  if p.url and not secret.reveal(p.url):match("^https?://") then return false, "url must be an http(s) URL" end
  if p.command and type(p.command) ~= "string" and not secret.is(p.command) then
    return false, "command must be a string"
  end
  if type(p.timeout) ~= "number" or p.timeout <= 0 then return false, "timeout must be a positive number" end
  if type(p.interval) ~= "number" or p.interval <= 0 then return false, "interval must be a positive number" end
  local statuses = type(p.status) == "table" and p.status or { p.status }
  for _, s in ipairs(statuses) do
    if not math.tointeger(s) then return false, "status must be an HTTP status or a list of them" end
  end
  p.statuses = statuses
  return true
end

--- Wait for a condition on the target (see the module comment).
-- @return the step result: {changed = false, attempts =, elapsed =, msg =} (failed on timeout)
function Host:wait_for(params)
  if type(params) ~= "table" then error("wait_for: table of parameters expected, got " .. type(params), 2) end
  local p = { host = "127.0.0.1", status = 200, timeout = 60, interval = 1, state = "started" }
  local opts = {}
  for key, v in pairs(params) do
    if PARAMS[key] then
      p[key] = v
    elseif STEP_OPTS[key] then
      opts[key] = v
    else
      error("wait_for: unknown parameter '" .. tostring(key) .. "'", 2)
    end
  end
  local ok, msg = validate(p)
  if not ok then error("wait_for: " .. msg, 2) end
  local kind = p.port and "port" or p.url and "url" or "command"
  local check = checks[kind]
  return self:step("wait_for", label_of(p), opts, function(h)
    local t0 = k_core.now()
    local deadline = t0 + p.timeout
    -- bounded twice: by the clock, and by the number of attempts the clock allows
    local max_attempts = math.ceil(p.timeout / p.interval) + 2
    local attempts, seen = 0, nil
    while attempts < max_attempts do
      attempts = attempts + 1
      local left = deadline - k_core.now()
      local done
      done, seen = check(h, p, math.min(math.max(left, 1), 30))
      if done then
        local elapsed = k_core.now() - t0
        return { changed = false, attempts = attempts, elapsed = elapsed,
          msg = attempts > 1 and string.format("%s after %.1f s (%d attempts)", seen, elapsed, attempts) or nil }
      end
      left = deadline - k_core.now()
      if left <= 0 then break end
      k_core.sleep(math.min(p.interval, left))
    end
    local elapsed = k_core.now() - t0
    local what = kind == "port" and ((p.state == "stopped" and "port still open: " or "port not open: ") ..
      p.host .. ":" .. math.tointeger(p.port))
      or kind == "url" and ("no status " .. table.concat(p.statuses, "/") .. " from " ..
        (secret.is(p.url) and "***" or p.url))
      or "command did not succeed"
    return { failed = true, changed = false, attempts = attempts, elapsed = elapsed,
      msg = string.format("timed out after %.1f s (%d attempt%s): %s; last: %s", elapsed, attempts,
        attempts == 1 and "" or "s", what, seen) }
  end)
end

M.wait_for = Host.wait_for
return M
