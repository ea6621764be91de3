--- Recipes and resources: declaration, validation and loading.
-- `k.recipe{...}` declares what to do on each host; `k.resource{...}`
-- declares a kind of step (probe → diff → apply) that becomes a method on
-- every host.  Recipe files run in their own environment where reading an
-- undefined global is an error, so typos fail at once with file:line.
-- @module kengine.recipe
local M = {}

local recipe_mt = { __name = "kengine.recipe" }
recipe_mt.__index = recipe_mt
local resource_mt = { __name = "kengine.resource" }

M.resources = {}          -- name -> resource declaration
M.recipe_mt = recipe_mt

local function check_fields(kind, t, allowed, level)
  for key in pairs(t) do
    if not allowed[key] then
      error(string.format("%s: unknown field '%s'", kind, tostring(key)), level + 1)
    end
  end
end

local RECIPE_FIELDS = { name = true, hosts = true, vars = true, run = true, handlers = true, sudo = true,
  serial = true, tags = true, description = true, check_safe = true }

--- Declare a recipe.
-- @param t {name=, hosts="group or pattern", vars={defaults}, run=function(h), handlers={name=fn(h)},
--   sudo=bool, serial=N, tags={...}, description=}
function M.recipe(t)
  if type(t) ~= "table" then error("recipe: table expected, got " .. type(t), 2) end
  check_fields("recipe", t, RECIPE_FIELDS, 2)
  if type(t.run) ~= "function" then error("recipe: field 'run' must be a function(h)", 2) end
  if t.name ~= nil and type(t.name) ~= "string" then error("recipe: field 'name' must be a string", 2) end
  if t.hosts ~= nil and type(t.hosts) ~= "string" then error("recipe: field 'hosts' must be a pattern string", 2) end
  if t.vars ~= nil and type(t.vars) ~= "table" then error("recipe: field 'vars' must be a table", 2) end
  if t.handlers ~= nil and type(t.handlers) ~= "table" then error("recipe: field 'handlers' must be a table", 2) end
  if t.serial ~= nil and (math.type(t.serial) ~= "integer" or t.serial < 1) then
    error("recipe: field 'serial' must be a positive integer", 2)
  end
  local info = debug.getinfo(2, "S")
  local r = setmetatable({}, recipe_mt)
  for key, v in pairs(t) do r[key] = v end
  r.source = info and info.short_src
  r.name = r.name or (r.source and r.source:match("([^/]+)%.lua$")) or "recipe"
  r.hosts = r.hosts or "all"
  r.vars = r.vars or {}
  r.handlers = r.handlers or {}
  return r
end

function M.is_recipe(v) return getmetatable(v) == recipe_mt end

local RESOURCE_FIELDS = { name = true, probe = true, diff = true, apply = true, label = true, validate = true,
  description = true, defaults = true, params_own = true }

-- names the host object already uses: a resource there would never be reached
local HOST_METHODS = { raw = true, read = true, write = true, exec = true, step = true, resource = true,
  log = true, fail = true, handler = true, notify = true, include = true, run_once = true, login_user = true,
  wait_for = true, command = true, shell = true, k8s_rollout = true, batch = true }
M.HOST_METHODS = HOST_METHODS

--- Declare a resource; it becomes the method h:<name>{...} on every host.
-- probe(h, p) reads the current state (runs in every mode, must not change
-- anything); diff(h, p, state) returns nil when in the desired state, else a
-- table {summary=, before=, after=, ...}; apply(h, p, state, changes) makes
-- the change.  A resource without probe and diff cannot honour check mode, so
-- declaring one is an error.
function M.resource(t)
  if type(t) ~= "table" then error("resource: table expected, got " .. type(t), 2) end
  check_fields("resource", t, RESOURCE_FIELDS, 2)
  if type(t.name) ~= "string" or not t.name:match("^[%a_][%w_]*$") then
    error("resource: field 'name' must be an identifier", 2)
  end
  if HOST_METHODS[t.name] then
    error("resource: '" .. t.name .. "' is a host method name; choose another name", 2)
  end
  for _, f in ipairs({ "probe", "diff", "apply" }) do
    if type(t[f]) ~= "function" then
      error(string.format("resource '%s' has no %s function: every resource needs probe, diff and apply " ..
        "so that check mode can report what would change", t.name, f), 2)
    end
  end
  local r = setmetatable({}, resource_mt)
  for key, v in pairs(t) do r[key] = v end
  M.resources[t.name] = r
  return r
end

--- A strict environment: standard globals, and an error for undefined names.
function M.env()
  return setmetatable({}, {
    __index = function(_, name)
      local v = _G[name]
      if v == nil then error("undefined variable '" .. tostring(name) .. "'", 2) end
      return v
    end,
  })
end

local function dirname(path) return path:match("^(.*)/[^/]*$") or "." end

--- Load a Lua file in a strict environment.
-- @return what the chunk returned, or nil, "file:line: message", "ELOAD"
function M.load(path)
  local fn, err = loadfile(path, "t", M.env())
  if not fn then return nil, err, "ELOAD" end
  local ok, res = xpcall(fn, debug.traceback)
  if not ok then return nil, res, "ELOAD" end
  return res
end

--- Load another recipe, relative to the calling recipe's file.
function M.include(path)
  local info = debug.getinfo(2, "S")
  if path:sub(1, 1) ~= "/" and info and info.source:sub(1, 1) == "@" then
    path = dirname(info.source:sub(2)) .. "/" .. path
  end
  local fn, err = loadfile(path, "t", M.env())
  if not fn then error(err, 2) end
  local r = fn()
  if not M.is_recipe(r) then error("include: " .. path .. " does not return a recipe", 2) end
  return r
end

return M
