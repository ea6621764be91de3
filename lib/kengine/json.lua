--- JSON through lua-cjson, with empty arrays and objects chosen on purpose.
-- `json.array(t)` marks a table as an array, so an empty one encodes as `[]`;
-- unmarked empty tables encode as `{}`.  `json.null` is cjson's null.
-- @module kengine.json
local cjson = require "cjson"

local M = { null = cjson.null }

local array_mt = { __name = "kengine.json.array" }
-- cjson has no per-table switch for empty tables; a marker string that no
-- real document contains stands in for [] and is replaced after encoding
local EMPTY = "\0kengine-empty-array\0"
local EMPTY_JSON = cjson.encode(EMPTY)

--- Mark t (default: a new table) as a JSON array.
function M.array(t)
  return setmetatable(t or {}, array_mt)
end

--- Mark t (default: a new table) as a JSON object (the default for {}).
function M.object(t)
  return t or {}
end

local function has_empty_arrays(v, seen)
  if type(v) ~= "table" then return false end
  if seen[v] then return false end
  seen[v] = true
  if getmetatable(v) == array_mt and next(v) == nil then return true end
  for _, x in pairs(v) do
    if has_empty_arrays(x, seen) then return true end
  end
  return false
end

local function substitute(v)
  if type(v) ~= "table" then return v end
  if getmetatable(v) == array_mt and next(v) == nil then return EMPTY end
  local copy = {}
  for key, x in pairs(v) do copy[key] = substitute(x) end
  return copy
end

--- Encode a value; raises on values JSON cannot hold (functions, cycles).
function M.encode(v)
  if not has_empty_arrays(v, {}) then return cjson.encode(v) end
  local s = cjson.encode(substitute(v))
  return (s:gsub(EMPTY_JSON:gsub("%p", "%%%0"), "[]"))
end

-- cjson 2.1.0 decodes every number as a float; integral ones become integers
local function integers(v, depth)
  if type(v) ~= "table" or depth > 100 then return v end
  for key, x in pairs(v) do
    if math.type(x) == "float" then
      local i = math.tointeger(x)
      if i then v[key] = i end
    elseif type(x) == "table" then
      integers(x, depth + 1)
    end
  end
  return v
end

--- Decode a JSON text (integral numbers come back as integers).
-- @return value or nil, string, string
function M.decode(s)
  local ok, v = pcall(cjson.decode, s)
  if ok then
    if math.type(v) == "float" and math.tointeger(v) then return math.tointeger(v) end
    return integers(v, 0)
  end
  return nil, "EPROTO: invalid JSON: " .. tostring(v), "EPROTO"
end

return M
