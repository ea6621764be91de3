--- The runner: converge a recipe on many hosts at once.
-- One task per host (at most `forks` at a time), one SSH connection per host
-- for the whole run.  A failed step ends that host's run; other hosts carry
-- on; notified handlers run at the end, also after a failure.
-- @module kengine.runner
local core = require "kengine.core"
local ssh = require "kengine.ssh"
local json = require "kengine.json"
local secret = require "kengine.secret"
local inventory = require "kengine.inventory"
local hostmod = require "kengine.host"
local report = require "kengine.report"

local M = {}

M.DEFAULT_FORKS = 200

local StepError, Abort = hostmod.StepError, hostmod.Abort

local function deep_copy(v, seen)
  if type(v) ~= "table" or secret.is(v) then return v end
  seen = seen or {}
  if seen[v] then return seen[v] end
  local t = {}
  seen[v] = t
  for key, x in pairs(v) do t[key] = deep_copy(x, seen) end
  return setmetatable(t, getmetatable(v))
end

--- Parse one -e argument: key=value (value typed: true/false/numbers), a JSON
-- object, or @file.json.  @return table or nil, msg
function M.parse_extra(arg)
  if arg:sub(1, 1) == "@" then
    local f = io.open(arg:sub(2), "r")
    if not f then return nil, "cannot read extra vars file " .. arg:sub(2) end
    local text = f:read("a")
    f:close()
    local v, err = json.decode(text)
    if type(v) ~= "table" then return nil, arg:sub(2) .. ": " .. (err or "JSON object expected") end
    return v
  end
  if arg:sub(1, 1) == "{" then
    local v, err = json.decode(arg)
    if type(v) ~= "table" then return nil, "-e: " .. (err or "JSON object expected") end
    return v
  end
  local key, value = arg:match("^([%a_][%w_]*)=(.*)$")
  if not key then return nil, "-e: expected key=value, a JSON object or @file.json, got '" .. arg .. "'" end
  if value == "true" then value = true
  elseif value == "false" then value = false
  elseif math.tointeger(tonumber(value)) and value:match("^%-?%d+$") then value = math.tointeger(tonumber(value))
  elseif tonumber(value) and value:match("^%-?%d+%.%d+$") then value = tonumber(value)
  end
  return { [key] = value }
end

local function msghandler(e)
  if getmetatable(e) == StepError or e == Abort then return e end
  return debug.traceback(tostring(e), 2)
end

local function run_handlers(h)
  for _, name in ipairs(h.handler_order) do
    if h.notified[name] then
      h.run.report:message(h.name, "handler: " .. name)
      local ok, e = xpcall(h.handlers[name], msghandler, h)
      if not ok then
        h.failed = true
        if getmetatable(e) == StepError then
          h.error = h.error or e.message
        elseif e ~= Abort then
          h.error = h.error or tostring(e)
          h.error_reported = false
        end
      end
    end
  end
  for name in pairs(h.notified) do
    if not h.handlers[name] then
      h.failed = true
      h.error = h.error or ("notified handler '" .. name .. "' is not defined")
    end
  end
end

local function connect(h)
  local c = h.conn
  return ssh.connect {
    host = c.host or h.name, port = c.port, user = c.user,
    identity = c.identity, known_hosts = c.known_hosts or os.getenv("KENGINE_KNOWN_HOSTS"),
    host_key = c.host_key,
    password = c.password and secret.reveal(c.password) or nil,
    agent = c.agent, timeout = c.timeout or 30, config = c.config,
    max_channels = c.max_channels,
  }
end

local function run_host(run, r, name)
  local t0 = core.now()
  local I = run.inventory
  local vars = deep_copy(r.vars or {})
  for key, v in pairs(inventory.host_vars(I, name)) do vars[key] = v end
  for key, v in pairs(run.extra_vars) do vars[key] = v end
  local conn = inventory.connection(I, name)
  local h = hostmod.Host.new(run, name, vars, conn)
  h.sudo_default = r.sudo or conn.sudo or false
  h.sudo_password = conn.sudo_password or vars.sudo_password
  local names = {}
  for hn in pairs(r.handlers or {}) do names[#names + 1] = hn end
  table.sort(names)
  for _, hn in ipairs(names) do h:handler(hn, r.handlers[hn]) end
  run.hosts[#run.hosts + 1] = h
  run.by_name[name] = h

  local s, err = connect(h)
  if not s then
    h.unreachable = err
    run:host_failed(h)
  else
    h.session = s
    local ok, e = xpcall(r.run, msghandler, h)
    if not ok then
      h.failed = true
      if e == Abort then
        h.error = "stopped: another host failed (--fail-fast)"
      elseif getmetatable(e) == StepError then
        h.error = e.message
        if e.transport then h.unreachable = e.message end
      else
        h.error = tostring(e)
        h.error_reported = false
        run:host_failed(h)
      end
    end
    if not h.unreachable and e ~= Abort then run_handlers(h) end
    s:close()
  end
  h.duration = core.now() - t0
  run.done = run.done + 1
  run.report:host_end(h)
  run.report:show_progress(run.done, run.total, run.running - 1)
end

-- run names with at most `forks` hosts at a time
local function run_batch(run, r, names)
  local next_i = 0
  local function worker()
    while true do
      next_i = next_i + 1
      local name = names[next_i]
      if not name then return end
      run.running = run.running + 1
      run_host(run, r, name)
      run.running = run.running - 1
    end
  end
  local tasks = {}
  for i = 1, math.min(run.forks, #names) do tasks[i] = core.spawn(worker) end
  for _, t in ipairs(tasks) do
    local ok, err = t:wait()
    if ok == nil and err ~= nil then error(err, 0) end
  end
end

--- Run a recipe.
-- @param r the recipe
-- @param opts {inventory=, limit=, check=, diff=, extra_vars=, forks=, verbose=, json=file, out=file,
--   tags={...}, skip_tags={...}, fail_fast=}
-- @return exit status: 0 all converged, 1 a host failed or was unreachable, 2 usage error
function M.run(r, opts)
  local I = opts.inventory
  local rep = report.new({ out = opts.out, json = opts.json, verbose = opts.verbose })
  local names, err = inventory.select(I, r.hosts)
  if not names then
    rep:line("kengine: recipe " .. r.name .. ": " .. err)
    return 2
  end
  if opts.limit then
    local limited, lerr = inventory.select(I, opts.limit)
    if not limited then
      rep:line("kengine: --limit: " .. lerr)
      return 2
    end
    local keep = {}
    for _, n in ipairs(limited) do keep[n] = true end
    local out = {}
    for _, n in ipairs(names) do if keep[n] then out[#out + 1] = n end end
    names = out
  end
  local run = {
    inventory = I, check = opts.check or false, diff = opts.diff or false,
    extra_vars = opts.extra_vars or {}, forks = opts.forks or M.DEFAULT_FORKS,
    tags = opts.tags, skip_tags = opts.skip_tags, recipe_tags = r.tags,
    fail_fast = opts.fail_fast, aborted = false, report = rep, once = {},
    hosts = {}, by_name = {}, done = 0, running = 0, total = #names,
  }
  function run.host_failed(self)
    if self.fail_fast then self.aborted = true end
  end
  local t0 = core.now()
  rep:run_start({ recipe = r.name, file = r.source, hosts = names, check = run.check, diff = run.diff })
  if #names == 0 then
    rep:line("no hosts matched '" .. r.hosts .. "'" .. (opts.limit and (" and --limit " .. opts.limit) or ""))
  end
  local serial = r.serial or #names
  local i = 1
  while i <= #names do
    local batch = {}
    for j = i, math.min(#names, i + serial - 1) do batch[#batch + 1] = names[j] end
    run_batch(run, r, batch)
    i = i + serial
    if run.aborted then break end
  end
  -- hosts never started (after --fail-fast) are not in the recap
  table.sort(run.hosts, function(a, b) return a.name < b.name end)
  local code = 0
  for _, h in ipairs(run.hosts) do
    if h.failed or h.unreachable then code = 1 end
  end
  rep:recap(run.hosts, code, core.now() - t0)
  return code, run
end

return M
