--- Readable rendering of Lua values (REPL results, debugging).
-- Keys sorted, nested tables indented, cycles marked, long tables cut.
-- @module kengine.pretty
local M = {}

local function key_order(a, b)
  local ta, tb = type(a), type(b)
  if ta ~= tb then return ta < tb end
  if ta == "number" or ta == "string" then return a < b end
  return tostring(a) < tostring(b)
end

local function is_ident(s)
  return type(s) == "string" and s:match("^[%a_][%w_]*$") ~= nil
end

local function scalar(v)
  if type(v) == "string" then return string.format("%q", v):gsub("\\\n", "\\n") end
  return tostring(v)
end

--- Render v as a string.
-- @param v any value
-- @param opts {indent = "  ", depth = 8, max_items = 200}
function M.format(v, opts)
  opts = opts or {}
  local indent, max_depth, max_items = opts.indent or "  ", opts.depth or 8, opts.max_items or 200
  local out, seen = {}, {}
  local function emit(x, level)
    if type(x) ~= "table" then out[#out + 1] = scalar(x); return end
    local mt = getmetatable(x)
    if mt and mt.__tostring then out[#out + 1] = tostring(x); return end
    if seen[x] then out[#out + 1] = "<cycle>"; return end
    if level >= max_depth then out[#out + 1] = "{...}"; return end
    if next(x) == nil then out[#out + 1] = "{}"; return end
    seen[x] = true
    local keys, n = {}, #x
    for k in pairs(x) do
      if not (math.type(k) == "integer" and k >= 1 and k <= n) then keys[#keys + 1] = k end
    end
    table.sort(keys, key_order)
    local pad = indent:rep(level + 1)
    out[#out + 1] = "{\n"
    local count = 0
    for i = 1, n do
      count = count + 1
      if count > max_items then break end
      out[#out + 1] = pad
      emit(x[i], level + 1)
      out[#out + 1] = ",\n"
    end
    for _, k in ipairs(keys) do
      count = count + 1
      if count > max_items then break end
      out[#out + 1] = pad
      if is_ident(k) then out[#out + 1] = k else
        out[#out + 1] = "["; out[#out + 1] = scalar(k); out[#out + 1] = "]"
      end
      out[#out + 1] = " = "
      emit(x[k], level + 1)
      out[#out + 1] = ",\n"
    end
    if count > max_items then out[#out + 1] = pad .. "...\n" end
    out[#out + 1] = indent:rep(level) .. "}"
    seen[x] = nil
  end
  emit(v, 0)
  return table.concat(out)
end

return M
