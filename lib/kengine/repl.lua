--- The interactive REPL: `kengine repl`.
-- Line editing and history through libedit; incomplete chunks continue on the
-- next line; expressions print their values, tables pretty-printed; `k` is
-- the kengine module.  Each input runs as a task, so background tasks keep
-- running while it waits.
-- @module kengine.repl
local k = require "kengine"
local rl = require "kengine.readline"
local pretty = require "kengine.pretty"

local M = {}

local function history_file()
  local home = k.getenv("HOME")
  return k.getenv("KENGINE_HISTORY") or (home and home .. "/.kengine_history")
end

local function incomplete(err)
  return err and err:sub(-5) == "<eof>"
end

--- Compile one input, trying it as an expression first.
-- @return function, or nil and "incomplete", or nil and an error message
local function compile(src, env)
  local fn = load("return " .. src, "=stdin", "t", env)
  if fn then return fn end
  local err
  fn, err = load(src, "=stdin", "t", env)
  if fn then return fn end
  if incomplete(err) then return nil, "incomplete" end
  return nil, err
end

local function print_results(out, n, ...)
  for i = 1, n do
    local v = select(i, ...)
    out:write(pretty.format(v), "\n")
  end
end

--- Run the REPL until end of input.
-- @param opts {env = table of extra globals, out = file}
function M.run(opts)
  opts = opts or {}
  local out = opts.out or io.stdout
  local env = setmetatable({ k = k }, { __index = _G })
  for name, v in pairs(opts.env or {}) do env[name] = v end
  local hist = history_file()
  if hist then rl.read_history(hist) end
  if rl.isatty(0) then
    out:write(string.format("kengine %s (Lua %s) — `k` is the kengine module; Ctrl-D quits\n",
      k.version, k.core.lua_version))
  end
  local buffer
  while true do
    local line = rl.readline(buffer and ">> " or "> ")
    if line == nil then break end
    buffer = buffer and (buffer .. "\n" .. line) or line
    local fn, err = compile(buffer, env)
    if err ~= "incomplete" then
      if buffer:match("%S") then rl.add_history(buffer) end
      buffer = nil
      if not fn then
        out:write(err, "\n")
      else
        local task = k.spawn(function() return table.pack(xpcall(fn, debug.traceback)) end)
        local r = task:wait()
        if r[1] then print_results(out, r.n - 1, table.unpack(r, 2, r.n))
        else out:write(tostring(r[2]), "\n") end
      end
    end
    out:flush()
  end
  if hist then rl.write_history(hist) end
  if rl.isatty(0) then out:write("\n") end
end

return M
