--- kengine: the Lua API over the engine's primitives.
-- `local k = require "kengine"`; every function that waits (SSH, HTTP, local
-- commands, sleep) yields to the engine loop when called inside a task and
-- drives the loop itself otherwise.
-- @module kengine
local core = require "kengine.core"
local proc = require "kengine.proc"
local json = require "kengine.json"

local M = {
  version = "0.1.0",
  core = core,
  ssh = require "kengine.ssh",
  http = require "kengine.http",
  json = json,
  -- local primitives
  exec = proc.exec,
  read_file = proc.read_file,
  write_file = proc.write_file,
  getenv = proc.getenv,
  -- time and tasks
  sleep = core.sleep,
  now = core.now,
  time = core.time,
  spawn = core.spawn,
  yield = core.yield,
  run = core.run,
}

-- recipes, resources, secrets (loaded on first use: plain scripts don't pay for them)
local lazy = {
  recipe = function() return require("kengine.recipe").recipe end,
  resource = function() return require("kengine.recipe").resource end,
  include = function() return require("kengine.recipe").include end,
  secret = function() return require("kengine.secret").new end,
  secret_env = function() return require("kengine.secret").from_env end,
  resources = function() return require("kengine.resources") end,
}
setmetatable(M, { __index = function(t, key)
  local f = lazy[key]
  if not f then return nil end
  local v = f()
  rawset(t, key, v)
  if key == "recipe" or key == "resource" then require("kengine.resources") end
  return v
end })

--- Run fn(item, i) for every item concurrently.
-- @return results in the order of list (the first value each call returned),
-- and a table of errors by index, or nil when none failed
function M.parallel(list, fn)
  local tasks, results, errors = {}, {}, nil
  for i, item in ipairs(list) do
    tasks[i] = core.spawn(fn, item, i)
  end
  for i, t in ipairs(tasks) do
    local first, err = t:wait()
    if t:status() == "failed" then
      errors = errors or {}
      errors[i] = err
    else
      results[i] = first
    end
  end
  return results, errors
end

--- Versions of kengine and the libraries it embeds.
function M.versions()
  local cjson = require "cjson"
  return {
    kengine = M.version,
    lua = core.lua_version,
    libssh = M.ssh.libssh_version,
    libcurl = M.http.libcurl_version,
    ["lua-cjson"] = cjson._VERSION,
  }
end

return M
