--- The host object a recipe's run(h) receives, and the step machinery.
-- Every resource call (h:file{...}) and every h:exec is a step: the runtime
-- owns probing, check mode, diffs, status and counts, retries, changed_when/
-- failed_when, notifications and the failure record.  Resources talk to the
-- target only through h:raw / h:read / h:write, which honour sudo and keep
-- secrets off command lines.
-- @module kengine.host
local secret = require "kengine.secret"
local recipe = require "kengine.recipe"
local diff = require "kengine.diff"
local k_core = require "kengine.core"

local M = {}

local Host = {}
M.Host = Host

local StepError = { __name = "kengine.step_error" }
StepError.__tostring = function(e) return e.message end
M.StepError = StepError

local Abort = setmetatable({}, { __tostring = function() return "run aborted (--fail-fast)" end })
M.Abort = Abort

local LIB_MARK = "/lib/kengine/"

--- shell single-quoting
function M.quote(s)
  s = tostring(s)
  if s:match("^[%w%._/:=@%-]+$") then return s end
  return "'" .. s:gsub("'", "'\\''") .. "'"
end
local quote = M.quote

-- where in the recipe a step was called: the first frame outside lib/kengine
local function caller()
  for level = 3, 40 do
    local info = debug.getinfo(level, "Sl")
    if not info then break end
    if info.source:sub(1, 1) == "@" and not info.source:find(LIB_MARK, 1, true) and info.currentline > 0 then
      return info.short_src, info.currentline
    end
  end
  return nil, nil
end

--- the last n lines of a text (default 5)
local function tail(text, n)
  local lines = {}
  for l in (text or ""):gmatch("[^\n]+") do lines[#lines + 1] = l end
  return table.concat(lines, "\n", math.max(1, #lines - (n or 5) + 1))
end
M.tail = tail

--- a text without leading and trailing white space
function M.trim(s) return ((s or ""):gsub("^%s+", ""):gsub("%s+$", "")) end

function Host.new(run, name, vars, conn)
  local h = setmetatable({
    name = name, vars = vars, conn = conn, run = run, check = run.check,
    counts = { ok = 0, changed = 0, failed = 0, skipped = 0 },
    notified = {}, notified_order = {}, handlers = {}, handler_order = {},
  }, M.mt)
  return h
end

-- h:<resource>{...} for every declared resource
M.mt = {
  __name = "kengine.host",
  __index = function(_, key)
    local m = Host[key]
    if m ~= nil then return m end
    local res = recipe.resources[key]
    if res then
      return function(self, params) return self:resource(res, params) end
    end
    return nil
  end,
  __tostring = function(h) return "kengine.host (" .. h.name .. ")" end,
}

--- The user the session logged in as (as the inventory names it).
function Host:login_user() return self.conn.user or "root" end

local function effective_sudo(h, opts)
  if opts and opts.sudo ~= nil then return opts.sudo end
  if h._step_sudo ~= nil then return h._step_sudo end
  return h.sudo_default or false
end

--- Run a command on the target without recording a step (for resources).
-- Honours sudo (password through `sudo -S` on stdin) and keeps a command that
-- holds a secret off the command line (it travels on stdin).
-- @return {code, stdout, stderr}; raises on a transport failure
function Host:raw(cmd, opts)
  opts = opts or {}
  local has_secret = secret.is(cmd)
  local script = secret.reveal(cmd)
  local stdin = secret.reveal(opts.stdin)
  local shown = tostring(cmd)
  if has_secret then shown = secret.redact(script) end
  local line = script
  if has_secret then
    -- the script goes first on stdin; dd reads exactly its bytes and leaves the rest
    stdin = script .. (stdin or "")
    line = string.format("eval \"$(dd bs=1 count=%d 2>/dev/null)\"", #script)
  end
  if effective_sudo(self, opts) and self:login_user() ~= "root" then
    local pw = self.sudo_password
    if pw then
      line = "sudo -S -p '' -- sh -c " .. quote(line)
      stdin = secret.reveal(pw) .. "\n" .. (stdin or "")
    else
      line = "sudo -n -- sh -c " .. quote(line)
    end
  end
  local res, err, code = self.session:exec(line, { stdin = stdin, timeout = opts.timeout })
  self.run.report:echo(self.name, shown, res)
  if not res then
    -- a command that outlived its timeout fails its step; the connection is fine
    -- (the session stays usable); anything else means the connection is gone
    error(setmetatable({ message = err, code = code, transport = code ~= "ETIMEDOUT" }, StepError), 0)
  end
  return res
end

local MARK = "@@kengine_rc@@"

--- Run several shell snippets in one round trip (for resources): each one's
-- output (stdout and stderr together) and exit status come back in order.
-- @return list of {out =, rc =}; raises when the target's output is garbled
function Host:batch(snippets, opts)
  local parts = {}
  for i, s in ipairs(snippets) do
    parts[i] = "{ " .. s .. "\n} 2>&1; printf '\\n%s %s\\n' " .. MARK .. " \"$?\""
  end
  local r = self:raw(table.concat(parts, "\n"), opts)
  local out, pos = {}, 1
  for _ = 1, #snippets do
    local s, e, rc = r.stdout:find("\n" .. MARK .. " (%d+)\n", pos)
    if not s then error("unexpected output from the target: " .. tail(r.stdout .. r.stderr, 5), 0) end
    out[#out + 1] = { out = r.stdout:sub(pos, s - 1), rc = tonumber(rc) }
    pos = e + 1
  end
  return out
end

--- Read a remote file (sudo-aware); nil when it does not exist.
function Host:read(path)
  local r = self:raw("cat -- " .. quote(path) .. " 2>/dev/null || { [ -e " .. quote(path) .. " ] && exit 2; exit 1; }")
  if r.code == 0 then return r.stdout end
  if r.code == 1 then return nil end
  error(setmetatable({ message = "cannot read " .. path .. " on " .. self.name, code = "EACCES" }, StepError), 0)
end

--- Write a remote file atomically (temp file beside it, then rename).
-- opts: mode (default: keep the existing file's, else 0644), owner, group
function Host:write(path, content, opts)
  opts = opts or {}
  local p = quote(path)
  local mode = opts.mode and quote(opts.mode) or nil
  local parts = {
    "p=" .. p .. "; umask 077; t=$(mktemp \"$(dirname -- \"$p\")/.kengine-XXXXXX\") || exit 1",
    "ok() { cat > \"$t\" || return 1",
    mode and ("chmod " .. mode .. " \"$t\" || return 1")
      or "if [ -e \"$p\" ]; then chmod --reference=\"$p\" \"$t\"; else chmod 0644 \"$t\"; fi || return 1",
  }
  if opts.owner or opts.group then
    parts[#parts + 1] = "chown " .. quote((opts.owner or "") .. (opts.group and (":" .. opts.group) or "")) ..
      " \"$t\" || return 1"
  elseif self:login_user() == "root" or effective_sudo(self, opts) then
    parts[#parts + 1] = "if [ -e \"$p\" ]; then chown --reference=\"$p\" \"$t\" || return 1; fi"
  end
  parts[#parts + 1] = "mv -Tf -- \"$t\" \"$p\"; }" -- -T: never into a directory a link points to
  parts[#parts + 1] = "if ok; then exit 0; fi; rm -f -- \"$t\"; exit 1"
  local r = self:raw(table.concat(parts, "\n"), { stdin = content, sudo = opts.sudo })
  if r.code ~= 0 then
    error(setmetatable({ message = "cannot write " .. path .. ": " .. tail(r.stderr, 3), code = "EIO",
      stderr = r.stderr }, StepError), 0)
  end
  return true
end

--- Print a message in the run's output.
function Host:log(...)
  local parts = {}
  for i = 1, select("#", ...) do parts[i] = tostring((select(i, ...))) end
  self.run.report:message(self.name, table.concat(parts, " "))
end

--- Fail this host's run with a message (a failed step, at the caller's line).
function Host:fail(msg)
  return self:step("fail", "", {}, function() return { failed = true, msg = tostring(msg) } end)
end

--- Register a handler: it runs once, after the run's steps, if notified.
function Host:handler(name, fn)
  if not self.handlers[name] then self.handler_order[#self.handler_order + 1] = name end
  self.handlers[name] = fn
end

--- Notify a handler by name.
function Host:notify(name)
  if type(name) == "table" then
    for _, n in ipairs(name) do self:notify(n) end
    return
  end
  if not self.notified[name] then
    self.notified[name] = true
    self.notified_order[#self.notified_order + 1] = name
  end
end

--- Run another recipe's steps on this host (its vars fill in missing ones).
function Host:include(r)
  if not recipe.is_recipe(r) then error("include: recipe expected", 2) end
  for key, v in pairs(r.vars or {}) do
    if self.vars[key] == nil then self.vars[key] = v end
  end
  for name, fn in pairs(r.handlers or {}) do
    if not self.handlers[name] then self:handler(name, fn) end
  end
  local saved = self.sudo_default
  if r.sudo ~= nil then self.sudo_default = r.sudo end
  local res = table.pack(r.run(self))
  self.sudo_default = saved
  return table.unpack(res, 1, res.n)
end

--- Run fn once for the whole run (on the first host that gets here); every
-- host gets its results.
function Host:run_once(key, fn)
  local once = self.run.once
  if not once[key] then
    once[key] = k_core.spawn(function() return fn(self) end)
  end
  local t = once[key]
  local res = table.pack(t:wait())
  if t:status() == "failed" then
    error(setmetatable({ message = "run_once '" .. key .. "' failed: " .. tostring(res[2]) }, StepError), 0)
  end
  return table.unpack(res, 1, res.n)
end

-- tags: a step runs unless --tags excludes it or --skip-tags names it
local function tag_skip(run, tags)
  tags = type(tags) == "string" and { tags } or tags or {}
  local set = {}
  for _, t in ipairs(tags) do set[t] = true end
  for _, t in ipairs(run.recipe_tags or {}) do set[t] = true end
  if run.skip_tags then
    for _, t in ipairs(run.skip_tags) do if set[t] then return true end end
  end
  if run.tags and not set.always then
    for _, t in ipairs(run.tags) do if set[t] then return false end end
    return true
  end
  return false
end

local STEP_OPTS = { name = true, notify = true, sudo = true, ignore_errors = true, retries = true, delay = true,
  ["until"] = true, changed_when = true, failed_when = true, tags = true, check_safe = true, creates = true,
  removes = true, stdin = true, timeout = true, diff = true }
M.STEP_OPTS = STEP_OPTS

--- The step machinery shared by resources and exec.
-- body(h) returns a result table {changed=, failed=, skipped=, msg=, diff=, ...}
function Host:step(kind, label, opts, body)
  local run = self.run
  if run.aborted then error(Abort, 0) end
  local file, line = caller()
  local rec = { host = self.name, step = kind .. (label and label ~= "" and (" " .. label) or ""),
    resource = kind, file = file, line = line, check = self.check }
  if opts.name then rec.step = opts.name end
  if tag_skip(run, opts.tags) then
    rec.status, rec.duration, rec.msg = "skipped", 0, "tags"
    self.counts.skipped = self.counts.skipped + 1
    run.report:step(rec)
    return { skipped = true }
  end
  local t0 = k_core.now()
  local saved_sudo = self._step_sudo
  self._step_sudo = effective_sudo(self, opts)
  local attempts = (opts.retries or 0) + 1
  local result, err
  for attempt = 1, attempts do
    local ok, r = pcall(body, self)
    if ok then
      result, err = r, nil
      if opts.changed_when ~= nil then
        local v = opts.changed_when
        if type(v) == "function" then v = v(result) end
        result.changed = v and true or false
      end
      if opts.failed_when ~= nil then
        local v = opts.failed_when
        if type(v) == "function" then v = v(result) end
        result.failed = v and true or false
        if not v then result.msg = nil end
      end
      local done = not result.failed
      if opts["until"] then done = not result.skipped and opts["until"](result) and true or false end
      if done or result.skipped then break end
      if opts["until"] and attempt == attempts then
        result.failed = true
        result.msg = result.msg or string.format("condition not met after %d attempt%s", attempts,
          attempts == 1 and "" or "s")
      end
    else
      result, err = nil, r
      if getmetatable(r) == StepError and r.transport then break end -- the connection is gone
      if r == Abort then break end
    end
    if attempt < attempts then k_core.sleep(opts.delay or 1) end
  end
  self._step_sudo = saved_sudo
  rec.duration = k_core.now() - t0
  if err ~= nil then
    if err == Abort then error(Abort, 0) end
    result = { failed = true }
    if getmetatable(err) == StepError then
      result.msg, result.code, result.stderr = err.message, err.code, err.stderr
      result.transport = err.transport
    else
      result.msg = tostring(err)
    end
  end
  local status = result.failed and "failed" or result.skipped and "skipped" or result.changed and "changed" or "ok"
  rec.status = status
  rec.msg = result.msg
  rec.command, rec.code = result.command, result.code
  if status == "failed" then rec.stderr = tail(result.stderr, 10) end
  if run.diff and opts.diff ~= false and (result.diff_before ~= nil or result.diff_after ~= nil) then
    rec.diff = diff.unified(secret.redact(result.diff_before or ""), secret.redact(result.diff_after or ""),
      "before: " .. (result.diff_name or label or ""), "after: " .. (result.diff_name or label or ""))
  end
  rec.changes = result.changes
  self.counts[status] = self.counts[status] + 1
  run.report:step(rec)
  if result.changed and not result.failed and opts.notify then self:notify(opts.notify) end
  if result.failed then
    if result.transport or not opts.ignore_errors then
      self.error_reported = true
      run:host_failed(self)
      error(setmetatable({ message = rec.step .. ": " .. tostring(result.msg or "failed"), record = rec,
        file = file, line = line, transport = result.transport }, StepError), 0)
    end
  end
  return result
end

--- Split step options from resource parameters.
local function split(res, params)
  local p, opts = {}, {}
  for key, v in pairs(params) do
    if STEP_OPTS[key] and not (res.params_own and res.params_own[key]) then opts[key] = v else p[key] = v end
  end
  return p, opts
end

--- Run a resource as a step: probe, diff, and (unless in check mode) apply.
function Host:resource(res, params)
  if type(params) ~= "table" then
    error(string.format("%s: table of parameters expected, got %s", res.name, type(params)), 3)
  end
  local p, opts = split(res, params)
  for key, v in pairs(res.defaults or {}) do if p[key] == nil then p[key] = v end end
  local label = res.label and select(2, pcall(res.label, p)) or ""
  if type(label) ~= "string" then label = "" end
  if res.validate then
    local ok, msg = res.validate(p)
    if not ok then
      -- a bad parameter is a failed step like any other: counted, recorded, at file:line
      return self:step(res.name, label, opts, function()
        return { failed = true, msg = res.name .. ": " .. tostring(msg) }
      end)
    end
  end
  return self:step(res.name, label, opts, function(h)
    local state = res.probe(h, p)
    local changes = res.diff(h, p, state)
    if changes == nil or changes == false then
      return { changed = false, state = state }
    end
    local r = { changed = true, state = state, msg = changes.summary, changes = changes.fields,
      diff_before = changes.before, diff_after = changes.after, diff_name = changes.name }
    if h.check then return r end
    local applied = res.apply(h, p, state, changes)
    if type(applied) == "table" then
      for key, v in pairs(applied) do r[key] = v end
    end
    return r
  end)
end

--- Run a command as a step.  Not run in check mode unless check_safe = true
-- (then its result is still returned, marked skipped).  creates/removes
-- skip it when a path exists / does not exist.  A non-zero exit fails the
-- step unless failed_when says otherwise.
-- @return {code, stdout, stderr, changed, skipped}
function Host:exec(cmd, opts)
  opts = opts or {}
  if type(cmd) ~= "string" and not secret.is(cmd) then
    error("exec: command string expected, got " .. type(cmd), 2)
  end
  for key in pairs(opts) do
    if not STEP_OPTS[key] then error("exec: unknown option '" .. tostring(key) .. "'", 2) end
  end
  local shown = secret.redact(secret.reveal(cmd))
  local label = #shown > 60 and (shown:sub(1, 57) .. "...") or shown
  return self:step("exec", label, opts, function(h)
    if opts.creates then
      local r = h:raw("test -e " .. quote(opts.creates))
      if r.code == 0 then return { changed = false, skipped = true, msg = opts.creates .. " exists" } end
    end
    if opts.removes then
      local r = h:raw("test -e " .. quote(opts.removes))
      if r.code ~= 0 then return { changed = false, skipped = true, msg = opts.removes .. " does not exist" } end
    end
    if h.check and not opts.check_safe then
      return { skipped = true, changed = false, code = nil, stdout = "", stderr = "",
        msg = "not run in check mode", command = shown }
    end
    local r = h:raw(cmd, { stdin = opts.stdin, timeout = opts.timeout })
    r.command = shown
    r.changed = not opts.check_safe
    if r.code ~= 0 then
      r.failed = true
      r.msg = "exit status " .. r.code
    end
    return r
  end)
end

return M
