--- Secrets: opaque values that every output shows as `***`.
-- `k.secret(value)` wraps a string; `tostring` gives "***", concatenation
-- gives another secret, and `redact(text)` replaces every known secret value
-- in a text (human output, -v echoes, diffs, error records, the JSON log).
-- Only `reveal` gives the value back, for the transport that needs it.
-- @module kengine.secret
local M = {}

local mt = { __name = "kengine.secret" }
local store = setmetatable({}, { __mode = "k" }) -- secret -> value
local known = {}                                   -- value -> true, for redaction
local known_list = {}                              -- longest first

local function remember(value)
  if value == "" or known[value] then return end
  known[value] = true
  known_list[#known_list + 1] = value
  table.sort(known_list, function(a, b) return #a > #b end)
end

--- Wrap a string (or number) as a secret.
function M.new(value)
  if getmetatable(value) == mt then return value end
  assert(type(value) == "string" or type(value) == "number",
    "secret value must be a string (got " .. type(value) .. ")")
  value = tostring(value)
  local s = setmetatable({}, mt)
  store[s] = value
  remember(value)
  return s
end

--- Is v a secret?
function M.is(v) return getmetatable(v) == mt end

--- The value behind a secret, or v itself when it is not one.
function M.reveal(v)
  if getmetatable(v) == mt then return store[v] end
  return v
end

--- A secret from an environment variable, or nil, msg, code when unset or empty.
function M.from_env(name)
  local v = os.getenv(name)
  if v == nil or v == "" then return nil, "ENOENT: environment variable " .. name .. " is not set", "ENOENT" end
  return M.new(v)
end

mt.__tostring = function() return "***" end
mt.__concat = function(a, b) return M.new(tostring(M.reveal(a)) .. tostring(M.reveal(b))) end
mt.__len = function(s) return #store[s] end
mt.__eq = function(a, b) return M.reveal(a) == M.reveal(b) end
mt.__index = function(_, key) error("attempt to index a secret (field '" .. tostring(key) .. "')", 2) end

--- Replace every known secret value in text by ***.
function M.redact(text)
  if type(text) ~= "string" or #known_list == 0 then return text end
  for _, v in ipairs(known_list) do
    if text:find(v, 1, true) then
      text = text:gsub(v:gsub("[%p]", "%%%0"), "***")
    end
  end
  return text
end

--- Reveal every secret inside a (possibly nested) table, for the wire.
function M.reveal_deep(v, seen)
  if getmetatable(v) == mt then return store[v] end
  if type(v) ~= "table" then return v end
  seen = seen or {}
  if seen[v] then return seen[v] end
  local copy = {}
  seen[v] = copy
  for key, x in pairs(v) do copy[key] = M.reveal_deep(x, seen) end
  return setmetatable(copy, getmetatable(v))
end

--- Does a (possibly nested) table hold a secret?
function M.contains(v, seen)
  if getmetatable(v) == mt then return true end
  if type(v) ~= "table" then return false end
  seen = seen or {}
  if seen[v] then return false end
  seen[v] = true
  for _, x in pairs(v) do if M.contains(x, seen) then return true end end
  return false
end

return M
