--- Templates compiled to Lua, rendered in a sandbox.
-- `{{ expr }}` inserts tostring(expr); `{% statements %}` runs Lua
-- (loops, conditions); `{# comment #}` is dropped.  A `-` inside a tag
-- (`{{- x -}}`, `{%- ... -%}`) trims the whitespace on that side.  The code
-- keeps the template's line numbers, so errors read `name:line: message`.
-- The template sees its vars and a few safe functions, nothing else.
-- @module kengine.template
local secret = require "kengine.secret"

local M = {}

local SAFE = { string = string, table = table, math = math, utf8 = utf8, pairs = pairs, ipairs = ipairs,
  tostring = tostring, tonumber = tonumber, type = type, select = select, next = next }

local function count_lines(s) local _, n = s:gsub("\n", "") return n end

--- Compile template text to a Lua function(vars) -> string.
-- @return function or nil, "name:line: message", "ETEMPLATE"
function M.compile(text, name)
  name = name or "template"
  local code = { "local _out, _sec = {}, false; local function _emit(v) " ..
    "if v == nil then return end; if _SECRET_IS(v) then _sec = true; v = _REVEAL(v) end; " ..
    "_out[#_out + 1] = tostring(v) end; " }
  local pos = 1
  local trim_next = false
  while pos <= #text do
    local s, e, open = text:find("{([{%%#])", pos)
    local literal = text:sub(pos, s and s - 1 or #text)
    if trim_next then literal = literal:gsub("^%s+", ""); trim_next = false end
    local close_ch = open == "{" and "}}" or open == "%" and "%}" or "#}"
    local trim_before = s and text:sub(e + 1, e + 1) == "-"
    if trim_before then literal = literal:gsub("%s+$", "") end
    if literal ~= "" then
      code[#code + 1] = "_emit(" .. string.format("%q", literal):gsub("\\\n", "\\n") .. ")" ..
        string.rep("\n", count_lines(literal))
    end
    if not s then break end
    local body_start = e + 1 + (trim_before and 1 or 0)
    local cs = text:find(close_ch, body_start, true)
    if not cs then
      local line = count_lines(text:sub(1, s)) + 1
      return nil, string.format("%s:%d: unclosed '{%s'", name, line, open), "ETEMPLATE"
    end
    local body = text:sub(body_start, cs - 1)
    if body:sub(-1) == "-" then body = body:sub(1, -2); trim_next = true end
    if open == "{" then
      code[#code + 1] = "_emit(" .. body .. ")"
    elseif open == "%" then
      code[#code + 1] = " " .. body .. " "
    end
    code[#code + 1] = string.rep("\n", count_lines(body))
    pos = cs + #close_ch
  end
  code[#code + 1] = " return table.concat(_out), _sec"
  local src = table.concat(code)
  local env = {}
  local fn, err = load(src, "=" .. name, "t", env)
  if not fn then return nil, err, "ETEMPLATE" end
  return function(vars)
    for key in pairs(env) do env[key] = nil end
    setmetatable(env, { __index = function(_, key)
      if key == "_SECRET_IS" then return secret.is end
      if key == "_REVEAL" then return secret.reveal end
      local v = vars and vars[key]
      if v ~= nil then return v end
      v = SAFE[key]
      if v ~= nil then return v end
      error("undefined variable '" .. tostring(key) .. "'", 2)
    end })
    local ok, out, had_secret = pcall(fn)
    if not ok then return nil, out, "ETEMPLATE" end
    if had_secret then return secret.new(out) end
    return out
  end
end

--- Render a template with vars.
-- @return string (a secret when a secret was inserted) or nil, msg, "ETEMPLATE"
function M.render(text, vars, name)
  local fn, err, code = M.compile(text, name)
  if not fn then return nil, err, code end
  return fn(vars)
end

return M
