--- Run output: live per-step lines, a recap table, and JSON events.
-- Every string passes through secret.redact before it leaves the process.
-- Human lines go to `out` (colour only on a terminal); JSON events (one per
-- line, schema in docs/json-events.md) go to `json` when given.
-- @module kengine.report
local json = require "kengine.json"
local secret = require "kengine.secret"
local rl = require "kengine.readline"

local M = {}
M.__index = M

local COLORS = { ok = "32", changed = "33", failed = "31", skipped = "36", unreachable = "31;1" }

local function redact_deep(v)
  if secret.is(v) then return "***" end
  if type(v) == "string" then return secret.redact(v) end
  if type(v) ~= "table" then return v end
  local t = {}
  for key, x in pairs(v) do t[key] = redact_deep(x) end
  return setmetatable(t, getmetatable(v))
end

--- New reporter.
-- @param opts {out=file, json=file or nil, verbose=bool, color=bool or nil (auto), progress=bool or nil}
function M.new(opts)
  local self = setmetatable({}, M)
  self.out = opts.out or io.stdout
  self.json = opts.json
  self.verbose = opts.verbose
  local tty = self.out == io.stdout and rl.isatty(1) or self.out == io.stderr and rl.isatty(2)
  if opts.color == nil then self.color = tty and os.getenv("NO_COLOR") == nil else self.color = opts.color end
  self.progress = opts.progress == nil and tty or opts.progress
  self.progress_shown = false
  return self
end

function M:paint(status, text)
  if not self.color or not COLORS[status] then return text end
  return "\27[" .. COLORS[status] .. "m" .. text .. "\27[0m"
end

function M:line(text)
  if self.progress_shown then self.out:write("\r\27[K"); self.progress_shown = false end
  self.out:write(secret.redact(text), "\n")
  self.out:flush()
end

function M:event(ev)
  if not self.json then return end
  ev.time = ev.time or os.time()
  self.json:write(json.encode(redact_deep(ev)), "\n")
  self.json:flush()
end

--- Show "N/M hosts done" on a terminal while hosts run.
function M:show_progress(done, total, running)
  if not self.progress or total < 2 then return end
  self.out:write(string.format("\r\27[K[%d/%d hosts done, %d running]", done, total, running))
  self.out:flush()
  self.progress_shown = true
end

function M:run_start(info)
  local flags = {}
  if info.check then flags[#flags + 1] = "check mode" end
  if info.diff then flags[#flags + 1] = "diff" end
  self:line(string.format("== %s: %d host%s%s", info.recipe, #info.hosts, #info.hosts == 1 and "" or "s",
    #flags > 0 and " (" .. table.concat(flags, ", ") .. ")" or ""))
  self:event({ event = "run_start", recipe = info.recipe, file = info.file, hosts = info.hosts,
    check = info.check or false, diff = info.diff or false })
end

local function fmt_duration(d)
  if d < 1 then return string.format("%d ms", math.floor(d * 1000 + 0.5)) end
  return string.format("%.1f s", d)
end

--- One step finished.  rec = {host, step, resource, status, duration, file, line, msg,
-- diff, command, code, stderr, stdout, changes, would}
function M:step(rec)
  local status = rec.status
  local word = status
  if rec.check and status == "changed" then word = "changed*" end
  self:line(string.format("[%s] %s %s (%s)%s", rec.host, self:paint(status, string.format("%-8s", word)),
    rec.step, fmt_duration(rec.duration or 0), rec.msg and status ~= "failed" and (" — " .. rec.msg) or ""))
  if status == "failed" then
    local lines = {}
    if rec.file then lines[#lines + 1] = "at " .. rec.file .. ":" .. (rec.line or "?") end
    if rec.command then lines[#lines + 1] = "command: " .. rec.command end
    if rec.code then lines[#lines + 1] = "exit status: " .. rec.code end
    if rec.msg then lines[#lines + 1] = "error: " .. rec.msg end
    if rec.stderr and rec.stderr ~= "" then
      lines[#lines + 1] = "stderr (last lines):"
      for l in rec.stderr:gmatch("[^\n]+") do lines[#lines + 1] = "  " .. l end
    end
    for _, l in ipairs(lines) do self:line("    " .. l) end
  end
  if rec.diff and rec.diff ~= "" then
    for l in rec.diff:gmatch("[^\n]*") do
      if l ~= "" then
        local c = l:sub(1, 1)
        self:line("    " .. ((c == "+" and l:sub(1, 3) ~= "+++") and self:paint("ok", l)
          or (c == "-" and l:sub(1, 3) ~= "---") and self:paint("failed", l) or l))
      end
    end
  end
  self:event({ event = "step", host = rec.host, step = rec.step, resource = rec.resource, status = status,
    changed = status == "changed", check = rec.check or false, duration = rec.duration, file = rec.file,
    line = rec.line, msg = rec.msg, command = rec.command, code = rec.code, stderr = rec.stderr,
    diff = rec.diff, changes = rec.changes })
end

--- Verbose echo of a command and its output.
function M:echo(host, cmd, res)
  if not self.verbose then return end
  self:line(string.format("[%s] $ %s", host, cmd))
  if res then
    for l in (res.stdout or ""):gmatch("[^\n]+") do self:line("    | " .. l) end
    for l in (res.stderr or ""):gmatch("[^\n]+") do self:line("    ! " .. l) end
    if res.code and res.code ~= 0 then self:line("    exit " .. res.code) end
  end
end

function M:message(host, text)
  self:line(string.format("[%s] %s", host, text))
  self:event({ event = "message", host = host, msg = text })
end

function M:host_end(h)
  if h.unreachable then
    self:line(string.format("[%s] %s %s", h.name, self:paint("unreachable", "UNREACHABLE"), h.unreachable))
  elseif h.failed and h.error and not h.error_reported then
    self:line(string.format("[%s] %s %s", h.name, self:paint("failed", "FAILED"), h.error))
  end
  self:event({ event = "host_end", host = h.name,
    status = h.unreachable and "unreachable" or h.failed and "failed" or "ok",
    error = h.unreachable or h.error, counts = h.counts, duration = h.duration })
end

function M:recap(hosts, exit_code, duration)
  self:line("")
  self:line("RECAP")
  local w = 4
  for _, h in ipairs(hosts) do w = math.max(w, #h.name) end
  self:line(string.format("%-" .. w .. "s %5s %8s %7s %8s %12s %8s", "host", "ok", "changed", "failed", "skipped",
    "unreachable", "time"))
  local recap = {}
  for _, h in ipairs(hosts) do
    local c = h.counts
    local row = string.format("%-" .. w .. "s %5d %8d %7d %8d %12d %8s", h.name, c.ok, c.changed, c.failed,
      c.skipped, h.unreachable and 1 or 0, string.format("%.2fs", h.duration or 0))
    local status = h.unreachable and "unreachable" or c.failed > 0 and "failed" or h.failed and "failed"
      or c.changed > 0 and "changed" or "ok"
    self:line(self:paint(status, row))
    recap[h.name] = { ok = c.ok, changed = c.changed, failed = c.failed, skipped = c.skipped,
      unreachable = h.unreachable and 1 or 0, duration = h.duration }
  end
  self:event({ event = "recap", hosts = recap, exit = exit_code, duration = duration })
end

return M
