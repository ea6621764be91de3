--- Inventories: which hosts exist, how to reach them, and their variables.
-- Reads kengine's Lua form and Ansible's INI and YAML forms with ansible-core 2.14's semantics (group
-- order, `ungrouped`, host ranges, value typing, variable precedence), selects hosts with Ansible's
-- patterns, and prints an inventory in the shape of `ansible-inventory --list`.  See docs/inventory.md.
--
-- An inventory `I` is a plain table:
--
--    I.hosts[name]  = { name=, host=, port=, user=, vars = {own vars}, groups = {direct groups}, ssh = }
--    I.groups[name] = { name=, hosts = {names}, children = {names}, parents = {names}, vars = {},
--                       depth=, priority= }
--    I.vars  (the `all` group's vars: every host), I.ssh (connection defaults),
--    I.host_order, I.group_order (definition order), I.source, I.format ("lua", "ini", "yaml"),
--    I.warnings (what Ansible would warn about and skip)
--
-- Expected failures return `nil, "EINVENTORY: file:line: message", "EINVENTORY"` (or `ENOENT`, `EACCES`).
-- @module kengine.inventory
local json = require "kengine.json"

local M = {}

local type, pairs, ipairs, next, select = type, pairs, ipairs, next, select
local tostring, tonumber, error, pcall = tostring, tonumber, error, pcall
local getmetatable, setmetatable, rawget = getmetatable, setmetatable, rawget
local format, concat, sort, insert = string.format, table.concat, table.sort, table.insert
local mtype, tointeger, floor, huge = math.type, math.tointeger, math.floor, math.huge

local NULL = json.null
local ARRAY_MT = getmetatable(json.array())

-- ---- errors ---------------------------------------------------------------------------------------------

-- parse errors travel as a tagged table and become a fail tuple at the API boundary
local Raised = {}
local function raise(msg) error(setmetatable({ msg = msg }, Raised), 0) end

local function fail(msg) return nil, "EINVENTORY: " .. msg, "EINVENTORY" end

-- run fn(...) and turn a raise() into a fail tuple; other errors are bugs and propagate
local function protect(fn, ...)
  local res = table.pack(pcall(fn, ...))
  if res[1] then return table.unpack(res, 2, res.n) end
  if getmetatable(res[2]) == Raised then return fail(res[2].msg) end
  error(res[2], 0)
end

-- ---- values ---------------------------------------------------------------------------------------------

local function is_secret(v)
  local mt = getmetatable(v)
  return type(mt) == "table" and rawget(mt, "__name") == "kengine.secret"
end

local function sorted_keys(t)
  local keys = {}
  for key in pairs(t) do keys[#keys + 1] = key end
  sort(keys, function(a, b)
    local ta, tb = type(a), type(b)
    if ta ~= tb then return ta < tb end
    if ta == "number" or ta == "string" then return a < b end
    return tostring(a) < tostring(b)
  end)
  return keys
end

-- copy plain tables (and JSON arrays); secrets and other objects are kept as they are
local function deep_copy(v, seen)
  if type(v) ~= "table" then return v end
  local mt = getmetatable(v)
  if mt ~= nil and mt ~= ARRAY_MT then return v end
  seen = seen or {}
  if seen[v] then return seen[v] end
  local c = setmetatable({}, mt)
  seen[v] = c
  for key, x in pairs(v) do c[key] = deep_copy(x, seen) end
  return c
end

-- the value as JSON shows it: secrets become "***"
local function plain(v, seen)
  if is_secret(v) then return tostring(v) end
  if type(v) ~= "table" then return v end
  local mt = getmetatable(v)
  if mt ~= nil and mt ~= ARRAY_MT then return tostring(v) end
  seen = seen or {}
  if seen[v] then error("inventory value contains a cycle", 0) end
  seen[v] = true
  local c = setmetatable({}, mt)
  for key, x in pairs(v) do c[key] = plain(x, seen) end
  seen[v] = nil
  return c
end

local function is_array(t)
  if getmetatable(t) == ARRAY_MT then return true end
  local n = 0
  for _ in pairs(t) do n = n + 1 end
  if n == 0 then return false end
  for i = 1, n do if t[i] == nil then return false end end
  return true
end

local function array(t) return setmetatable(t or {}, ARRAY_MT) end

-- Python's repr() of a float, which is what ansible-inventory prints
local function pyfloat(x)
  if x ~= x then return "NaN" end
  if x == huge then return "Infinity" end
  if x == -huge then return "-Infinity" end
  if x == 0 then return (1 / x < 0) and "-0.0" or "0.0" end
  local s
  for p = 0, 16 do
    s = format("%." .. p .. "e", x)
    if tonumber(s) == x then break end
  end
  local sign, d1, rest, e = s:match("^(-?)(%d)%.?(%d*)e([-+]%d+)$")
  local digits = (d1 .. rest):gsub("0+$", "")
  if digits == "" then digits = "0" end
  local exp = tonumber(e)
  if exp < -4 or exp >= 16 then
    local m = digits:sub(1, 1) .. (#digits > 1 and ("." .. digits:sub(2)) or "")
    return format("%s%se%s%02d", sign, m, exp < 0 and "-" or "+", math.abs(exp))
  elseif exp < 0 then
    return sign .. "0." .. ("0"):rep(-exp - 1) .. digits
  end
  local int = digits:sub(1, exp + 1)
  int = int .. ("0"):rep(exp + 1 - #int)
  local frac = digits:sub(exp + 2)
  return sign .. int .. "." .. (frac == "" and "0" or frac)
end

local ESCAPES = { ['"'] = '\\"', ["\\"] = "\\\\", ["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t",
                  ["\b"] = "\\b", ["\f"] = "\\f" }
local function json_string(s)
  return '"' .. s:gsub('[%z\1-\31"\\]', function(c) return ESCAPES[c] or format("\\u%04x", c:byte()) end) .. '"'
end

-- the text of a JSON key, as Python's json module writes non-string keys
local function key_text(key)
  if type(key) == "string" then return key end
  if mtype(key) == "float" then return pyfloat(key) end
  return tostring(key)
end

--- Encode a value as JSON the way `ansible-inventory` prints it (Python's json.dumps with indent=4 and
-- sort_keys): keys sorted, 4-space indent, floats as Python writes them, secrets as "***".
-- @param v a value
-- @return string
function M.to_json(v)
  local out = {}
  local function enc(x, ind, seen)
    local tx = type(x)
    if x == nil or x == NULL then out[#out + 1] = "null"
    elseif tx == "boolean" then out[#out + 1] = tostring(x)
    elseif tx == "number" then out[#out + 1] = mtype(x) == "integer" and format("%d", x) or pyfloat(x)
    elseif tx == "string" then out[#out + 1] = json_string(x)
    elseif tx == "table" and not is_secret(x) and (getmetatable(x) == nil or getmetatable(x) == ARRAY_MT) then
      if seen[x] then error("cannot encode a table that contains itself", 0) end
      seen[x] = true
      local pad, inner = "\n" .. ("    "):rep(ind), "\n" .. ("    "):rep(ind + 1)
      if is_array(x) then
        if #x == 0 then out[#out + 1] = "[]" else
          out[#out + 1] = "["
          for i = 1, #x do
            out[#out + 1] = (i > 1 and "," or "") .. inner
            enc(x[i], ind + 1, seen)
          end
          out[#out + 1] = pad .. "]"
        end
      else
        local keys = {}
        local texts = {}
        for key in pairs(x) do
          local t = key_text(key)
          keys[#keys + 1] = t
          texts[t] = key
        end
        sort(keys)
        if #keys == 0 then out[#out + 1] = "{}" else
          out[#out + 1] = "{"
          for i, t in ipairs(keys) do
            out[#out + 1] = (i > 1 and "," or "") .. inner .. json_string(t) .. ": "
            enc(x[texts[t]], ind + 1, seen)
          end
          out[#out + 1] = pad .. "}"
        end
      end
      seen[x] = nil
    else
      out[#out + 1] = json_string(tostring(x))
    end
  end
  enc(v, 0, {})
  return concat(out)
end

-- ---- the inventory model (Ansible's InventoryData, Group and Host) --------------------------------------

local function new_group(name)
  return { name = name, hosts = {}, children = {}, parents = {}, vars = {}, depth = 0, priority = 1 }
end

-- a builder holds the inventory being read and the indexes that keep adds idempotent
local function builder(source, fmt)
  local all, ungrouped = new_group("all"), new_group("ungrouped")
  local I = {
    source = source, format = fmt, hosts = {}, groups = { all = all, ungrouped = ungrouped },
    vars = all.vars, ssh = {}, warnings = {}, host_order = {}, group_order = { "all", "ungrouped" },
  }
  all.children[1], ungrouped.parents[1] = "ungrouped", "all"
  return { I = I, member = { all = {}, ungrouped = {} } }
end

local function add_group(B, name)
  local I = B.I
  if not I.groups[name] then
    I.groups[name] = new_group(name)
    I.group_order[#I.group_order + 1] = name
    B.member[name] = {}
  end
  return I.groups[name]
end

local function contains(list, x)
  for _, v in ipairs(list) do if v == x then return true end end
  return false
end

local function remove_value(list, x)
  for i, v in ipairs(list) do
    if v == x then table.remove(list, i); return end
  end
end

-- a path of child links from `from` down to `to`, or nil
local function child_path(I, from, to, seen)
  if from == to then return { to } end
  seen = seen or {}
  if seen[from] then return nil end
  seen[from] = true
  for _, c in ipairs(I.groups[from].children) do
    local p = child_path(I, c, to, seen)
    if p then insert(p, 1, from); return p end
  end
  return nil
end

-- parent gets child as a child group; a loop is an error (where: "file:line" or "file")
local function add_child(B, parent, child, where)
  local I = B.I
  local p, c = I.groups[parent], I.groups[child]
  if contains(p.children, child) then return end
  if parent == child then raise(format("%s: group '%s' cannot be a child of itself", where, child)) end
  local loop = child_path(I, child, parent)
  if loop then
    loop[#loop + 1] = child
    raise(format("%s: group cycle: adding '%s' as a child of '%s' makes a loop (%s)", where, child, parent,
      concat(loop, " -> ")))
  end
  p.children[#p.children + 1] = child
  c.parents[#c.parents + 1] = parent
end

local function add_host(B, name, gname, port)
  local I = B.I
  local h = I.hosts[name]
  if not h then
    h = { name = name, host = name, vars = {}, groups = {} }
    I.hosts[name] = h
    I.host_order[#I.host_order + 1] = name
    if port then h.vars.ansible_port = port end
  end
  if gname and not B.member[gname][name] then
    B.member[gname][name] = true
    local g = I.groups[gname]
    g.hosts[#g.hosts + 1] = name
    h.groups[#h.groups + 1] = gname
  end
  return h
end

local function to_int(v)
  if type(v) == "number" then return tointeger(v) or tointeger(floor(v)) end
  if type(v) == "string" then
    local n = tonumber(v)
    return n and (tointeger(n) or tointeger(floor(n)))
  end
  return nil
end

local function set_group_var(I, gname, key, value, where)
  local g = I.groups[gname]
  if key == "ansible_group_priority" then
    g.priority = to_int(value) or raise(format("%s: ansible_group_priority must be an integer, got '%s'", where,
      tostring(value)))
  else
    g.vars[key] = value
  end
end

-- Ansible's reconcile_inventory: every group under `all`, hosts without a group in `ungrouped`
local function reconcile(B)
  local I = B.I
  for _, gname in ipairs(I.group_order) do
    if gname ~= "all" and #I.groups[gname].parents == 0 then add_child(B, "all", gname, I.source) end
  end
  local ungrouped = I.groups.ungrouped
  for _, hname in ipairs(I.host_order) do
    local h = I.hosts[hname]
    local others = 0
    for _, g in ipairs(h.groups) do
      if g ~= "all" and g ~= "ungrouped" then others = others + 1 end
    end
    if B.member.ungrouped[hname] then
      if others > 0 then
        B.member.ungrouped[hname] = nil
        remove_value(ungrouped.hosts, hname)
        remove_value(h.groups, "ungrouped")
      end
    elseif others == 0 then
      add_host(B, hname, "ungrouped")
    end
  end
end

local function port_of(v)
  local n = to_int(v)
  if n and n > 0 and n < 65536 then return n end
  return nil
end

-- depth (longest path from `all`, as Ansible counts it), and each host's own host/port/user
local function finish(B)
  reconcile(B)
  local I = B.I
  local depth = {}
  local function depth_of(gname, stack)
    if depth[gname] then return depth[gname] end
    local d = 0
    for _, p in ipairs(I.groups[gname].parents) do
      if not stack[p] then
        stack[p] = true
        local pd = depth_of(p, stack) + 1
        stack[p] = nil
        if pd > d then d = pd end
      end
    end
    depth[gname] = d
    return d
  end
  for _, gname in ipairs(I.group_order) do I.groups[gname].depth = depth_of(gname, { [gname] = true }) end
  for _, hname in ipairs(I.host_order) do
    local h = I.hosts[hname]
    local v = h.vars
    if h.host == hname and type(v.ansible_host) == "string" then h.host = v.ansible_host end
    if h.port == nil then h.port = port_of(v.ansible_port) end
    if h.user == nil and type(v.ansible_user) == "string" then h.user = v.ansible_user end
    for i, g in ipairs(h.groups) do
      if g == "all" then table.remove(h.groups, i); break end
    end
  end
  return I
end

-- ---- host patterns with ranges (ansible.parsing.utils.addresses, expand_hostname_range) ------------------

local function valid_alnum_range(inner)
  local a, b, rest = inner:match("^([%a%d]+):([%a%d]+)(.*)$")
  if not a or not (rest == "" or rest:match("^:%d+$")) then return false end
  return (a:match("^%a$") and b:match("^%a$")) or (a:match("^%d+$") and b:match("^%d+$")) or false
end

local function is_ipv4(addr)
  local parts = {}
  for p in (addr .. "."):gmatch("([^.]*)%.") do parts[#parts + 1] = p end
  if #parts ~= 4 then return false end
  for _, p in ipairs(parts) do
    local inner = p:match("^%[(.*)%]$")
    if inner then
      if not (inner:match("^%d+:%d+$") or inner:match("^%d+:%d+:%d+$")) then return false end
    else
      if not p:match("^%d%d?%d?$") then return false end
      if #p == 3 and not (p:match("^[01]") or p:match("^2[0-4]") or p:match("^25[0-5]$")) then return false end
    end
  end
  return true
end

local function is_ipv6(addr)
  local n = select(2, addr:gsub(":", ""))
  return n >= 2 and addr:match("^[%x:.%[%]]+$") ~= nil
end

local function is_hostname(addr)
  local ok = true
  local s = addr:gsub("%[([^%]]*)%]", function(inner)
    if valid_alnum_range(inner) then return "0" end
    ok = false
    return "\0"
  end)
  if not ok then return false end
  for label in (s .. "."):gmatch("([^.]*)%.") do
    if not label:match("^[%w_\128-\255][%w_%-\128-\255]*$") or label:match("[_%-]$") then return false end
  end
  return true
end

-- "host:port" (outside brackets) -> host, port
local function split_hostport(s)
  local i, n = 1, #s
  while i <= n do
    local c = s:sub(i, i)
    if c == "[" then
      local j = s:find("]", i + 1, true)
      if not j then return nil end
      i = j + 1
    elseif c == "]" then
      return nil
    elseif c == ":" then
      local port = s:sub(i + 1)
      if port:match("^%d+$") then return s:sub(1, i - 1), tonumber(port) end
      return nil
    else
      i = i + 1
    end
  end
  return nil
end

-- Ansible's parse_address(allow_ranges=True): host, port or nil
local function parse_address(address)
  local port
  local a, p = address:match("^%[(.+)%]:(%d+)$")
  if a then address, port = a, tonumber(p) end
  local h, p2 = split_hostport(address)
  if h then address, port = h, p2 end
  if is_ipv4(address) or is_ipv6(address) or is_hostname(address) then return address, port end
  return nil
end

local LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"

local function expand_range(line, out, where)
  local i = line:find("[", 1, true)
  if not i then out[#out + 1] = line; return out end
  local j = line:find("]", 1, true)
  if not j or j < i or line:find("|", 1, true) then
    raise(format("%s: invalid host range in '%s'", where, line))
  end
  local head, nrange, tail = line:sub(1, i - 1), line:sub(i + 1, j - 1), line:sub(j + 1)
  local bounds = {}
  for b in (nrange .. ":"):gmatch("([^:]*):") do bounds[#bounds + 1] = b end
  if #bounds ~= 2 and #bounds ~= 3 then raise(format("%s: host range must be begin:end or begin:end:step", where)) end
  local beg, fin, step = bounds[1], bounds[2], bounds[3] or "1"
  if beg == "" then beg = "0" end
  if fin == "" then raise(format("%s: host range must specify end value", where)) end
  local width
  if beg:sub(1, 1) == "0" and #beg > 1 then
    if #beg ~= #fin then raise(format("%s: host range must specify equal-length begin and end formats", where)) end
    width = #beg
  end
  local nstep = step:match("^%d+$") and tonumber(step)
  if not nstep or nstep == 0 then raise(format("%s: invalid host range step '%s'", where, step)) end
  local ib, ie = LETTERS:find(beg, 1, true), LETTERS:find(fin, 1, true)
  if ib and ie then
    if ib > ie then raise(format("%s: host range must have begin <= end", where)) end
    for k = ib, ie, nstep do expand_range(head .. LETTERS:sub(k, k) .. tail, out, where) end
  else
    local nb, ne = beg:match("^%d+$") and tonumber(beg), fin:match("^%d+$") and tonumber(fin)
    if not nb or not ne then raise(format("%s: invalid host range [%s]", where, nrange)) end
    for k = nb, ne, nstep do
      local s = tostring(k)
      if width and #s < width then s = ("0"):rep(width - #s) .. s end
      expand_range(head .. s .. tail, out, where)
    end
  end
  return out
end

-- a host pattern ("www[01:50].example.com:2222") -> list of names, port
local function expand_hostpattern(pattern, where)
  local host, port = parse_address(pattern)
  if not host then host, port = pattern, nil end
  if host:find("[", 1, true) then return expand_range(host, {}, where), port end
  return { host }, port
end

-- ---- Python literals (ast.literal_eval, as the INI plugin applies it to every value) ---------------------

local PY_ESCAPES = { ["\\"] = "\\", ["'"] = "'", ['"'] = '"', a = "\a", b = "\b", f = "\f", n = "\n",
                     r = "\r", t = "\t", v = "\v", ["\n"] = "" }

local function py_literal(s)
  local pos, n = 1, #s
  local NOPE = {}
  local function nope() error(NOPE, 0) end
  local function skip()
    while true do
      local _, e = s:find("^[ \t\f]+", pos)
      if e then pos = e + 1 end
      if s:sub(pos, pos) == "#" then pos = n + 1 end
      if not e then return end
    end
  end
  local value
  local function number()
    local tok = s:match("^[%w_.]+", pos)
    if tok:match("^[%d_.]*%d[eE]$") or tok:match("^[%d_]*%.[%d_]*[eE]$") then
      local ext = s:match("^[+-][%w_]+", pos + #tok)
      if ext then tok = tok .. ext end
    end
    pos = pos + #tok
    local low = tok:lower()
    local function clean(body, digit)
      if body == "" or body:find("__", 1, true) or body:find("_$") then nope() end
      if body:find("[^" .. digit .. "_]") then nope() end
      return (body:gsub("_", ""))
    end
    local prefix = low:sub(1, 2)
    if prefix == "0x" or prefix == "0o" or prefix == "0b" then
      local body = tok:sub(3)
      if body:sub(1, 1) == "_" then body = body:sub(2) end
      local digits = clean(body, prefix == "0x" and "%x" or prefix == "0o" and "0-7" or "01")
      local base = prefix == "0x" and 16 or prefix == "0o" and 8 or 2
      local v = 0
      for c in digits:gmatch(".") do v = v * base + tonumber(c, 16) end
      return v
    end
    if tok:find("^_") or tok:find("_$") or tok:find("__", 1, true) or tok:find("_[^%d]") or tok:find("[^%d]_") then
      nope()
    end
    local t = tok:gsub("_", "")
    if t:match("^%d+$") then
      if t:match("^0") and not t:match("^0+$") then nope() end
      return tointeger(tonumber(t)) or tonumber(t)
    end
    local mant = t:match("^([%d.]+)[eE][+-]?%d+$") or t
    if not (mant:match("^%d+%.?%d*$") or mant:match("^%.%d+$")) then nope() end
    return tonumber(t) + 0.0
  end
  local function py_string()
    local prefix = s:match("^[rRuUbB]*", pos)
    if #prefix > 2 or s:match("^[fF]", pos) then nope() end
    local raw = prefix:lower():find("r", 1, true) ~= nil
    pos = pos + #prefix
    local q = s:sub(pos, pos)
    if s:sub(pos, pos + 2) == q:rep(3) then q = q:rep(3) end
    pos = pos + #q
    local out = {}
    while true do
      if pos > n then nope() end
      if s:sub(pos, pos + #q - 1) == q then pos = pos + #q; break end
      local c = s:sub(pos, pos)
      if c == "\\" then
        local d = s:sub(pos + 1, pos + 1)
        if d == "" then nope() end
        if raw then
          out[#out + 1] = c .. d; pos = pos + 2
        elseif PY_ESCAPES[d] then
          out[#out + 1] = PY_ESCAPES[d]; pos = pos + 2
        elseif d:match("[0-7]") then
          local oct = s:match("^[0-7][0-7]?[0-7]?", pos + 1)
          out[#out + 1] = utf8.char(tonumber(oct, 8)); pos = pos + 1 + #oct
        elseif d == "x" or d == "u" or d == "U" then
          local len = d == "x" and 2 or d == "u" and 4 or 8
          local hex = s:sub(pos + 2, pos + 1 + len)
          if #hex ~= len or hex:find("%X") then nope() end
          local cp = tonumber(hex, 16)
          if cp > 0x10FFFF then nope() end
          out[#out + 1] = utf8.char(cp); pos = pos + 2 + len
        elseif d == "N" then
          nope()
        else
          out[#out + 1] = c .. d; pos = pos + 2
        end
      else
        out[#out + 1] = c; pos = pos + 1
      end
    end
    return concat(out)
  end
  local function items(close)
    local list, trailing = {}, false
    while true do
      skip()
      if s:sub(pos, pos) == close then pos = pos + 1; return list, trailing end
      list[#list + 1] = value()
      skip()
      local c = s:sub(pos, pos)
      if c == "," then pos = pos + 1; trailing = true
      elseif c == close then pos = pos + 1; return list, false
      else nope() end
    end
  end
  function value()
    skip()
    local c = s:sub(pos, pos)
    if c == "" then nope() end
    if c == "-" or c == "+" then
      pos = pos + 1
      skip()
      if not s:match("^%.?%d", pos) then nope() end
      local v = number()
      return c == "-" and -v or v
    end
    if c:match("%d") or s:match("^%.%d", pos) then return number() end
    if c == "'" or c == '"' or s:match("^[rRuUbBfF]+['\"]", pos) then
      local parts = { py_string() }
      while true do
        skip()
        if not s:match("^[rRuUbB]*['\"]", pos) then break end
        parts[#parts + 1] = py_string()
      end
      return concat(parts)
    end
    local name = s:match("^[%a_][%w_]*", pos)
    if name then
      pos = pos + #name
      if name == "True" then return true elseif name == "False" then return false
      elseif name == "None" then return NULL end
      nope()
    end
    pos = pos + 1
    if c == "[" then return array((items("]"))) end
    if c == "(" then
      local list, trailing = items(")")
      if #list == 1 and not trailing then return list[1] end
      return array(list)
    end
    if c == "{" then
      local d = {}
      skip()
      if s:sub(pos, pos) == "}" then pos = pos + 1; return d end
      while true do
        local key = value()
        skip()
        if s:sub(pos, pos) ~= ":" then nope() end -- a set, or not a literal
        pos = pos + 1
        local v = value()
        if type(key) == "table" then nope() end
        d[key == NULL and "null" or key_text(key)] = v
        skip()
        local sep = s:sub(pos, pos)
        pos = pos + 1
        if sep == "}" then return d end
        if sep ~= "," then nope() end
        skip()
        if s:sub(pos, pos) == "}" then pos = pos + 1; return d end
      end
    end
    nope()
  end
  local ok, v = pcall(function()
    local r = value()
    skip()
    if pos <= n then nope() end
    return r
  end)
  if ok then return v end
  if v ~= NOPE then error(v, 0) end
  return s
end

-- ---- shlex.split(line, comments=True) ---------------------------------------------------------------------

local function shlex_split(line)
  local tokens, pos, n = {}, 1, #line
  while pos <= n do
    local c = line:sub(pos, pos)
    if c:match("[ \t\r\n]") then
      pos = pos + 1
    elseif c == "#" then
      break
    else
      local tok, quoted = {}, false
      while pos <= n do
        c = line:sub(pos, pos)
        if c:match("[ \t\r\n]") then break
        elseif c == "#" then pos = n + 1; break
        elseif c == "\\" then
          if pos == n then return nil, "No escaped character" end
          tok[#tok + 1] = line:sub(pos + 1, pos + 1)
          pos = pos + 2
        elseif c == "'" then
          local j = line:find("'", pos + 1, true)
          if not j then return nil, "No closing quotation" end
          tok[#tok + 1] = line:sub(pos + 1, j - 1)
          quoted, pos = true, j + 1
        elseif c == '"' then
          pos = pos + 1
          quoted = true
          while true do
            if pos > n then return nil, "No closing quotation" end
            c = line:sub(pos, pos)
            if c == '"' then pos = pos + 1; break end
            if c == "\\" then
              local d = line:sub(pos + 1, pos + 1)
              if d == "" then return nil, "No closing quotation" end
              tok[#tok + 1] = (d == '"' or d == "\\") and d or (c .. d)
              pos = pos + 2
            else
              tok[#tok + 1] = c
              pos = pos + 1
            end
          end
        else
          tok[#tok + 1] = c
          pos = pos + 1
        end
      end
      if #tok > 0 or quoted then tokens[#tokens + 1] = concat(tok) end
    end
  end
  return tokens
end

-- ---- Ansible INI ----------------------------------------------------------------------------------------

local function strip(s) return (s:match("^%s*(.-)%s*$")) end

local function each_line(text)
  local lines = {}
  for l in (text:gsub("\r\n?", "\n") .. "\n"):gmatch("([^\n]*)\n") do lines[#lines + 1] = l end
  if text:sub(-1) == "\n" or text == "" then lines[#lines] = nil end
  return lines
end

local function parse_ini(text, path)
  local B = builder(path, "ini")
  local I = B.I
  local pending, seq = {}, 0
  local groupname, state = "ungrouped", "hosts"
  local lineno = 0
  local function where() return format("%s:%d", path, lineno) end
  local function err(msg) raise(format("%s:%d: %s", path, lineno, msg)) end

  local function add_pending_children(g)
    for _, parent in ipairs(pending[g].parents) do
      add_child(B, parent, g, format("%s:%d", path, pending[g].line))
      if pending[parent] and pending[parent].state == "children" then add_pending_children(parent) end
    end
    pending[g] = nil
  end

  for _, raw in ipairs(each_line(text)) do
    lineno = lineno + 1
    local line = strip(raw)
    local first = line:sub(1, 1)
    if line ~= "" and first ~= "#" and first ~= ";" then
      local name, tail = line:match("^%[([^:%]%s]+)(.*)$")
      local tag, after
      if name then
        tag, after = tail:match("^:([%w_\128-\255]+)%](.*)$")
        if not tag then after = tail:match("^%](.*)$") end
        if after and not (after:match("^%s*$") or after:match("^%s*#")) then after = nil end
      end
      if after then
        groupname, state = name, tag or "hosts"
        if state ~= "hosts" and state ~= "children" and state ~= "vars" then
          err(format("Section [%s:%s] has unknown type: %s", name, tag, state))
        end
        if not I.groups[groupname] then
          if state == "vars" and not pending[groupname] then
            seq = seq + 1
            pending[groupname] = { line = lineno, state = state, seq = seq }
          end
          add_group(B, groupname)
        end
        if pending[groupname] and state ~= "vars" then
          if pending[groupname].state == "children" then
            add_pending_children(groupname)
          elseif pending[groupname].state == "vars" then
            pending[groupname] = nil
          end
        end
      elseif first == "[" and line:sub(-1) == "]" then
        err(format("Invalid section entry: '%s'. Please make sure that there are no spaces in the section " ..
          "entry, and that there are no other invalid characters", line))
      elseif state == "hosts" then
        local tokens, serr = shlex_split(line)
        if not tokens then err(format("Error parsing host definition '%s': %s", line, serr)) end
        if tokens[1] then
          local names, port = expand_hostpattern(tokens[1], where())
          if strip(tokens[1]):sub(-1) == ":" and not port then
            err(format("Invalid host pattern '%s' supplied, ending in ':' is not allowed, this character is " ..
              "reserved to provide a port.", tokens[1]))
          end
          local vars = {}
          for i = 2, #tokens do
            local key, v = tokens[i]:match("^([^=]*)=(.*)$")
            if not key then err(format("Expected key=value host variable assignment, got: %s", tokens[i])) end
            vars[key] = py_literal(v)
          end
          for _, hname in ipairs(names) do
            if strip(hname) == "---" then
              err(format("Invalid host pattern '%s' supplied, '---' is normally a sign this is a YAML file.",
                tokens[1]))
            end
            if hname == "" then err("Invalid empty host name provided") end
            local h = add_host(B, hname, groupname, port)
            for key, v in pairs(vars) do h.vars[key] = v end
          end
        end
      elseif state == "vars" then
        local key, v = line:match("^([^=]*)=(.*)$")
        if not key then err(format("Expected key=value, got: %s", line)) end
        set_group_var(I, groupname, strip(key), py_literal(strip(v)), where())
      else -- children
        local child = line:match("^([^:%]%s]+)%s*$") or line:match("^([^:%]%s]+)%s*#")
        if not child then err(format("Expected group name, got: %s", line)) end
        if not I.groups[child] then
          if not pending[child] then
            seq = seq + 1
            pending[child] = { line = lineno, state = "children", parents = { groupname }, seq = seq }
          else
            local pc = pending[child].parents
            if pc then pc[#pc + 1] = groupname end
          end
        else
          add_child(B, groupname, child, where())
        end
      end
    end
  end
  local first
  for g, decl in pairs(pending) do
    if not first or decl.seq < pending[first].seq then first = g end
  end
  if first then
    local decl = pending[first]
    if decl.state == "vars" then
      raise(format("%s:%d: Section [%s:vars] not valid for undefined group: %s", path, decl.line, first, first))
    end
    raise(format("%s:%d: Section [%s:children] includes undefined group: %s", path, decl.line,
      decl.parents[#decl.parents], first))
  end
  return finish(B)
end

-- ---- YAML (libyaml events through Debian's lua-yaml, resolved as PyYAML's YAML 1.1 loader does) ---------

local YAML_TAG = "tag:yaml.org,2002:"

local BOOLS = { yes = true, Yes = true, YES = true, no = false, No = false, NO = false,
                ["true"] = true, True = true, TRUE = true, ["false"] = false, False = false, FALSE = false,
                on = true, On = true, ON = true, off = false, Off = false, OFF = false }
local NULLS = { [""] = true, ["~"] = true, null = true, Null = true, NULL = true }

local function base60(s)
  local v = 0
  for part in (s .. ":"):gmatch("([^:]*):") do v = v * 60 + tonumber(part) end
  return v
end

local function yaml_int(s)
  local sign, body = s:match("^([-+]?)(.*)$")
  body = body:gsub("_", "")
  local v
  if body == "0" then v = 0
  elseif body:match("^0b") then
    v = 0
    for c in body:sub(3):gmatch(".") do v = v * 2 + tonumber(c) end
  elseif body:match("^0x") then v = tonumber(body:sub(3), 16)
  elseif body:match("^0") then v = tonumber(body, 8)
  elseif body:find(":", 1, true) then v = base60(body)
  else v = tointeger(tonumber(body)) or tonumber(body) end
  if sign == "-" then v = -v end
  return v
end

local function is_yaml_int(s)
  local body = s:match("^[-+]?(.*)$")
  if body:match("^0b[01_]+$") or body:match("^0[0-7_]+$") or body == "0" or body:match("^[1-9][%d_]*$")
    or body:match("^0x[%x_]+$") then return true end
  if body:match("^[1-9][%d_]*:") then
    local rest = body:match("^[1-9][%d_]*(.*)$")
    return (rest:gsub(":[0-5]?%d", "")) == ""
  end
  return false
end

local function is_yaml_float(s)
  if s:match("^[-+]?%.inf$") or s:match("^[-+]?%.Inf$") or s:match("^[-+]?%.INF$") then return true end
  if s == ".nan" or s == ".NaN" or s == ".NAN" then return true end
  local body = s:match("^[-+]?(.*)$")
  local mant = body:match("^(.-)[eE][-+]%d+$") or body
  if mant:match("^%d[%d_]*%.[%d_]*$") then return true end
  if s:match("^%.%d[%d_]*$") or s:match("^%.%d[%d_]*[eE][-+]%d+$") then return true end
  if body:match("^%d[%d_]*:") then
    local head, frac = body:match("^%d[%d_]*(.*)%.([%d_]*)$")
    return head ~= nil and (head:gsub(":[0-5]?%d", "")) == "" and frac ~= nil
  end
  return false
end

local function yaml_float(s)
  local v = s:gsub("_", ""):lower()
  local sign = 1
  if v:sub(1, 1) == "-" then sign, v = -1, v:sub(2) elseif v:sub(1, 1) == "+" then v = v:sub(2) end
  if v == ".inf" then return sign * huge end
  if v == ".nan" then return 0 / 0 end
  if v:find(":", 1, true) then
    local ip, fp = v:match("^(.*):([^:]*)$")
    return sign * (base60(ip) * 60 + tonumber(fp))
  end
  return sign * (tonumber(v) + 0.0)
end

-- a YAML timestamp, as the isoformat() ansible-inventory prints
local function yaml_timestamp(s)
  if s:match("^%d%d%d%d%-%d%d%-%d%d$") then return s end
  local y, mo, d, rest = s:match("^(%d%d%d%d)%-(%d%d?)%-(%d%d?)(.*)$")
  if not y then return nil end
  local h, mi, sec, tail = rest:match("^[Tt]([0-9][0-9]?):(%d%d):(%d%d)(.*)$")
  if not h then h, mi, sec, tail = rest:match("^[ \t]+([0-9][0-9]?):(%d%d):(%d%d)(.*)$") end
  if not h then return nil end
  local frac, tz = tail:match("^%.(%d*)(.*)$")
  if not frac then frac, tz = "", tail end
  tz = tz:match("^[ \t]*(.*)$")
  local tzs
  if tz == "Z" then tzs = "+00:00"
  elseif tz ~= "" then
    local sgn, th, tm = tz:match("^([-+])(%d%d?)(.*)$")
    if not sgn then return nil end
    tm = tm == "" and "00" or tm:match("^:(%d%d)$")
    if not tm then return nil end
    tzs = format("%s%02d:%s", sgn, tonumber(th), tm)
  end
  local out = format("%s-%02d-%02dT%02d:%s:%s", y, tonumber(mo), tonumber(d), tonumber(h), mi, sec)
  local micro = tonumber((frac .. "000000"):sub(1, 6))
  if micro ~= 0 then out = out .. format(".%06d", micro) end
  return out .. (tzs or "")
end

local function implicit_scalar(v)
  if NULLS[v] then return NULL end
  if BOOLS[v] ~= nil then return BOOLS[v] end
  local c = v:sub(1, 1)
  if c:match("[-+%d.]") then
    if is_yaml_float(v) then return yaml_float(v) end
    if is_yaml_int(v) then return yaml_int(v) end
    if c:match("%d") then
      local ts = yaml_timestamp(v)
      if ts then return ts end
    end
  end
  return v
end

-- parse text into a node tree: {kind = "map"|"seq"|"scalar", line =, pairs/items/value, tag, plain}
local function yaml_compose(text, path)
  local yaml = require "yaml"
  local nxt = yaml.parser(text)
  local anchors = {}
  local function event()
    local ok, ev = pcall(nxt)
    if ok then return ev end
    local msg = tostring(ev)
    local what, line, col, ctx = msg:match("^(.-) at document: %d+, line: (%d+), column: (%d+)(.*)$")
    if not what then raise(format("%s: invalid YAML: %s", path, msg)) end
    ctx = ctx:gsub("^%s+", ""):gsub("%s+$", ""):gsub("line: (%d+), column: (%d+)", "line %1, column %2")
    raise(format("%s:%s: invalid YAML: %s at column %s%s", path, line, what, col,
      ctx ~= "" and (" (" .. ctx .. ")") or ""))
  end
  local node
  local function read_node(ev)
    local line = ev.start_mark.line + 1
    if ev.type == "ALIAS" then
      return anchors[ev.anchor] or raise(format("%s:%d: invalid YAML: found undefined alias '%s'", path, line,
        tostring(ev.anchor)))
    end
    local n = { line = line, tag = ev.tag }
    if ev.anchor then anchors[ev.anchor] = n end
    if ev.type == "SCALAR" then
      n.kind, n.value, n.plain = "scalar", ev.value, ev.plain_implicit
    elseif ev.type == "MAPPING_START" then
      n.kind, n.pairs = "map", {}
      while true do
        local e = event()
        if e.type == "MAPPING_END" then break end
        local k = node(e)
        local v = node(event())
        n.pairs[#n.pairs + 1] = { k, v }
      end
    elseif ev.type == "SEQUENCE_START" then
      n.kind, n.items = "seq", {}
      while true do
        local e = event()
        if e.type == "SEQUENCE_END" then break end
        n.items[#n.items + 1] = node(e)
      end
    else
      raise(format("%s:%d: invalid YAML: unexpected %s", path, line, tostring(ev.type)))
    end
    return n
  end
  node = read_node
  local root
  local e = event()
  if e.type ~= "STREAM_START" then raise(path .. ": invalid YAML stream") end
  e = event()
  if e.type == "DOCUMENT_START" then
    root = node(event())
    event() -- DOCUMENT_END
    e = event()
    if e.type == "DOCUMENT_START" then
      raise(format("%s:%d: expected a single document in the stream, but found another document", path,
        e.start_mark.line + 1))
    end
  end
  return root
end

local TYPE_NAMES = { string = "str", boolean = "bool", table = "dict" }

local function yaml_type_name(v, n)
  if n and n.kind == "seq" then return "list" end
  if n and n.kind == "map" then return "dict" end
  if v == NULL then return "NoneType" end
  if type(v) == "number" then return mtype(v) == "integer" and "int" or "float" end
  return TYPE_NAMES[type(v)] or type(v)
end

-- a plain scalar of a JSON document, typed as Python's json module does
local function json_scalar(v)
  if v == "true" then return true elseif v == "false" then return false elseif v == "null" then return NULL end
  if v:match("^%-?%d+$") then return tointeger(tonumber(v)) or tonumber(v) end
  if v:match("^%-?%d+%.?%d*[eE]?[-+]?%d*$") then return tonumber(v) + 0.0 end
  return implicit_scalar(v)
end

-- PyYAML's construction of a node tree into Lua values (json: the text is a JSON document, which Ansible
-- reads with json.loads before trying YAML)
local function yaml_constructor(path, warnings, is_json)
  local C = {}
  local implicit = is_json and json_scalar or implicit_scalar
  local built = {}

  function C.scalar(n)
    local tag = n.tag
    if tag == nil or tag == "!" then
      if tag == nil and n.plain then return implicit(n.value) end
      return n.value
    end
    local short = tag:sub(1, #YAML_TAG) == YAML_TAG and tag:sub(#YAML_TAG + 1)
    if short == "str" or tag == "!unsafe" then return n.value end
    if short == "null" then return NULL end
    if short == "bool" then
      local b = BOOLS[n.value]
      if b == nil then raise(format("%s:%d: invalid !!bool value '%s'", path, n.line, n.value)) end
      return b
    end
    if short == "int" and is_yaml_int(n.value) then return yaml_int(n.value) end
    if short == "float" then
      if is_yaml_float(n.value) then return yaml_float(n.value) end
      if is_yaml_int(n.value) then return yaml_int(n.value) + 0.0 end
    end
    if short == "timestamp" and yaml_timestamp(n.value) then return yaml_timestamp(n.value) end
    if tag == "!vault" then
      raise(format("%s:%d: encrypted !vault values are not supported", path, n.line))
    end
    raise(format("%s:%d: cannot use the tag '%s' on '%s'", path, n.line, tag, n.value))
  end

  local function is_merge_key(k)
    return k.kind == "scalar" and ((k.tag == nil and k.plain and k.value == "<<") or k.tag == YAML_TAG .. "merge")
  end

  -- the pairs of a mapping with merge keys (<<) flattened and duplicate keys folded (first place, last value)
  local flat_cache = {}
  function C.pairs(n)
    if flat_cache[n] then return flat_cache[n] end
    local merged, own = {}, {}
    for _, kv in ipairs(n.pairs) do
      local k, v = kv[1], kv[2]
      if is_merge_key(k) then
        if v.kind == "map" then
          for _, p in ipairs(C.pairs(v)) do merged[#merged + 1] = p end
        elseif v.kind == "seq" then
          for i = #v.items, 1, -1 do
            local sub = v.items[i]
            if sub.kind ~= "map" then
              raise(format("%s:%d: expected a mapping for merging, but found %s", path, sub.line, sub.kind))
            end
            for _, p in ipairs(C.pairs(sub)) do merged[#merged + 1] = p end
          end
        else
          raise(format("%s:%d: expected a mapping or list of mappings for merging", path, v.line))
        end
      else
        own[#own + 1] = kv
      end
    end
    local out, index = {}, {}
    local function put(kv, warn)
      local k = kv[1]
      if k.kind ~= "scalar" then raise(format("%s:%d: a mapping key must be a scalar", path, k.line)) end
      local key = C.value(k)
      local id = type(key) .. ":" .. tostring(key)
      if index[id] then
        if warn and not is_json then
          warnings[#warnings + 1] = format("%s:%d: found a duplicate dict key (%s); using last defined value only",
            path, k.line, tostring(key))
        end
        out[index[id]] = { k, kv[2], key }
      else
        out[#out + 1] = { k, kv[2], key }
        index[id] = #out
      end
    end
    for _, kv in ipairs(merged) do put(kv, false) end
    for _, kv in ipairs(own) do put(kv, true) end
    flat_cache[n] = out
    return out
  end

  function C.value(n)
    if n.kind == "scalar" then return C.scalar(n) end
    if built[n] then return built[n] end
    if n.tag and n.tag ~= "!" and n.tag ~= YAML_TAG .. "map" and n.tag ~= YAML_TAG .. "seq" then
      raise(format("%s:%d: cannot use the tag '%s' here", path, n.line, n.tag))
    end
    if n.kind == "seq" then
      local t = array()
      built[n] = t
      for i, item in ipairs(n.items) do t[i] = C.value(item) end
      return t
    end
    local t = {}
    built[n] = t
    for _, kv in ipairs(C.pairs(n)) do
      local key = kv[3]
      t[key == NULL and "null" or key_text(key)] = C.value(kv[2])
    end
    return t
  end

  return C
end

local function parse_yaml_tree(root, path, is_json)
  local B = builder(path, "yaml")
  local I = B.I
  local C = yaml_constructor(path, I.warnings, is_json)
  local function at(n) return format("%s:%d", path, n.line) end
  local function warn(n, msg) I.warnings[#I.warnings + 1] = at(n) .. ": " .. msg end

  if root == nil then raise(path .. ": parsed empty YAML file") end
  local rv = C.value(root)
  if rv == NULL or rv == false or rv == "" or (root.kind ~= "scalar" and next(rv) == nil) then
    raise(at(root) .. ": parsed empty YAML file")
  end
  if root.kind ~= "map" then
    raise(format("%s: YAML inventory has invalid structure, it should be a dictionary, got: %s", at(root),
      yaml_type_name(rv, root)))
  end
  if rv.plugin ~= nil and rv.plugin ~= false and rv.plugin ~= NULL and rv.plugin ~= "" then
    raise(at(root) .. ": plugin configuration YAML file, not YAML inventory")
  end

  local function kind(n)
    if n.kind ~= "scalar" then return n.kind end
    local v = C.value(n)
    if v == NULL then return "null" end
    return type(v) == "string" and "str" or "other"
  end

  local parse_group
  function parse_group(knode, name, data)
    if type(name) ~= "string" then
      if name == NULL or name == false or name == "" then
        raise(format("%s: invalid empty/false group name provided: %s", at(knode), tostring(name)))
      end
      raise(format("%s: invalid group name supplied, expected a string but got %s for %s", at(knode),
        yaml_type_name(name), tostring(name)))
    end
    local dk = kind(data)
    if dk ~= "map" and dk ~= "null" then
      warn(data, format("skipping '%s' as this is not a valid group definition", name))
      return name
    end
    add_group(B, name)
    if dk == "null" then return name end
    local entries = C.pairs(data)
    local sections = {}
    for _, kv in ipairs(entries) do
      local key, v = kv[3], kv[2]
      if key == "vars" or key == "children" or key == "hosts" then
        local vk = kind(v)
        if vk == "str" then
          sections[key] = { { v, { kind = "scalar", value = "", plain = true, line = v.line }, C.value(v) } }
        elseif vk ~= "map" and vk ~= "null" then
          raise(format('%s: invalid "%s" entry for "%s" group, requires a dictionary, found "%s" instead.',
            at(v), key, name, yaml_type_name(C.value(v), v)))
        end
      end
    end
    for _, kv in ipairs(entries) do
      local key, v = kv[3], kv[2]
      local list = sections[key] or (kind(v) == "map" and C.pairs(v))
      if not list then
        if kind(v) ~= "null" then -- (an empty key is skipped quietly)
          warn(v, format("skipping key (%s) in group (%s) as it is not a mapping, it is a %s", tostring(key), name,
            yaml_type_name(C.value(v), v)))
        end
      elseif key == "vars" then
        for _, var in ipairs(list) do
          local vname = var[3]
          set_group_var(I, name, vname == NULL and "null" or key_text(vname), C.value(var[2]), at(var[1]))
        end
      elseif key == "children" then
        for _, sub in ipairs(list) do
          local child = parse_group(sub[1], sub[3], sub[2])
          if not I.groups[child] then
            raise(format("%s: %s is not a known host nor group", at(sub[1]), tostring(child)))
          end
          add_child(B, name, child, at(sub[1]))
        end
      elseif key == "hosts" then
        for _, hp in ipairs(list) do
          local pattern = hp[3]
          if type(pattern) ~= "string" then
            raise(format("%s: host pattern %s must be a string. Enclose integers/floats in quotation marks.",
              at(hp[1]), tostring(pattern == NULL and "None" or pattern)))
          end
          local hk = kind(hp[2])
          if hk ~= "map" and hk ~= "null" then
            raise(format("%s: invalid data from file, expected dictionary and got: %s", at(hp[2]),
              tostring(C.value(hp[2]))))
          end
          local names, port = expand_hostpattern(pattern, at(hp[1]))
          local vars = hk == "map" and C.pairs(hp[2]) or {}
          for _, hname in ipairs(names) do
            if hname == "" then raise(at(hp[1]) .. ": invalid empty host name provided") end
            local h = add_host(B, hname, name, port)
            for _, var in ipairs(vars) do
              local vname = var[3]
              h.vars[vname == NULL and "null" or key_text(vname)] = C.value(var[2])
            end
          end
        end
      else
        warn(kv[1], format('skipping unexpected key (%s) in group (%s), only "vars", "children" and "hosts" are ' ..
          "valid", tostring(key), name))
      end
    end
    return name
  end

  for _, kv in ipairs(C.pairs(root)) do parse_group(kv[1], kv[3], kv[2]) end
  return finish(B)
end

local function parse_yaml(text, path)
  local is_json = text:match("^%s*[{%[]") ~= nil and json.decode(text) ~= nil
  return parse_yaml_tree(yaml_compose(text, path), path, is_json)
end

-- ---- the Lua form -----------------------------------------------------------------------------------------

local TOP_KEYS = { hosts = "table", groups = "table", vars = "table", ssh = "table" }
local HOST_KEYS = { host = "string", port = "number", user = "string", vars = "table", groups = "table",
                    ssh = "table" }
local GROUP_KEYS = { hosts = "table", children = "table", vars = "table", priority = "number" }
local SSH_TYPES = { host = "string", port = "number", user = "string", timeout = "number",
                    known_hosts = "string", host_key = "string", agent = "boolean", config = "boolean",
                    max_channels = "number" }

local function key_list(spec)
  local names = sorted_keys(spec)
  return concat(names, ", ")
end

-- what: where t is ("hosts.web1"), or nil for the top level
local function check_fields(src, what, t, spec)
  for _, key in ipairs(sorted_keys(t)) do
    local want = spec[key]
    if type(key) ~= "string" or not want then
      raise(format("%s: %sunknown key '%s' (expected %s)", src, what and (what .. ": ") or "", tostring(key),
        key_list(spec)))
    end
    if type(t[key]) ~= want then
      raise(format("%s: %s%s: %s expected, got %s", src, what and (what .. ".") or "", key, want, type(t[key])))
    end
  end
end

local function check_vars(src, what, vars)
  for key in pairs(vars) do
    if type(key) ~= "string" then
      raise(format("%s: %s: variable names must be strings, got %s %s", src, what, type(key), tostring(key)))
    end
  end
end

local function check_names(src, what, list)
  if getmetatable(list) == nil and next(list) ~= nil and not is_array(list) then
    raise(format("%s: %s: a list of names expected", src, what))
  end
  for i, name in ipairs(list) do
    if type(name) ~= "string" or name == "" then
      raise(format("%s: %s[%d]: a name (string) expected, got %s", src, what, i, type(name)))
    end
  end
end

local function check_port(src, what, port)
  if mtype(port) == "float" then port = tointeger(port) end
  if not port or port < 1 or port > 65535 then
    raise(format("%s: %s: a port number 1-65535 expected, got %s", src, what, tostring(port)))
  end
  return port
end

local function check_ssh(src, what, ssh)
  for key, v in pairs(ssh) do
    if type(key) ~= "string" then raise(format("%s: %s: unknown key '%s'", src, what, tostring(key))) end
    local want = SSH_TYPES[key]
    if want and type(v) ~= want then
      raise(format("%s: %s.%s: %s expected, got %s", src, what, key, want, type(v)))
    end
  end
  if ssh.port ~= nil then check_port(src, what .. ".port", ssh.port) end
end

local function build_from_table(t, src)
  if type(t) ~= "table" then raise(format("%s: an inventory must be a table, got %s", src, type(t))) end
  check_fields(src, nil, t, TOP_KEYS)
  local B = builder(src, "lua")
  local I = B.I
  if t.vars then
    check_vars(src, "vars", t.vars)
    for key, v in pairs(t.vars) do I.vars[key] = v end
  end
  if t.ssh then
    check_ssh(src, "ssh", t.ssh)
    for key, v in pairs(t.ssh) do I.ssh[key] = v end
  end
  local groups = t.groups or {}
  local gnames = sorted_keys(groups)
  for _, gname in ipairs(gnames) do
    local what = "groups." .. tostring(gname)
    if type(gname) ~= "string" or gname == "" then raise(format("%s: groups: a group name must be a string", src)) end
    if gname == "all" or gname == "ungrouped" then
      raise(format("%s: %s: '%s' is implicit (use the top-level vars for every host)", src, what, gname))
    end
    local g = groups[gname]
    if type(g) ~= "table" then raise(format("%s: %s: table expected, got %s", src, what, type(g))) end
    check_fields(src, what, g, GROUP_KEYS)
    if g.hosts then check_names(src, what .. ".hosts", g.hosts) end
    if g.children then check_names(src, what .. ".children", g.children) end
    if g.vars then check_vars(src, what .. ".vars", g.vars) end
    if g.priority and not tointeger(g.priority) then
      raise(format("%s: %s.priority: an integer expected", src, what))
    end
    local G = add_group(B, gname)
    if g.vars then for key, v in pairs(g.vars) do G.vars[key] = v end end
    if g.priority then G.priority = tointeger(g.priority) end
  end
  local hosts = t.hosts or {}
  for _, hkey in ipairs(sorted_keys(hosts)) do
    local what = "hosts." .. tostring(hkey)
    if type(hkey) ~= "string" or hkey == "" then
      raise(format("%s: hosts: a host name must be a string (got %s %s)", src, type(hkey), tostring(hkey)))
    end
    local e = hosts[hkey]
    if type(e) ~= "table" then raise(format("%s: %s: table expected, got %s", src, what, type(e))) end
    check_fields(src, what, e, HOST_KEYS)
    local port = e.port and check_port(src, what .. ".port", e.port)
    if e.vars then check_vars(src, what .. ".vars", e.vars) end
    if e.groups then check_names(src, what .. ".groups", e.groups) end
    if e.ssh then check_ssh(src, what .. ".ssh", e.ssh) end
    local names, pport = expand_hostpattern(hkey, src .. ": " .. what)
    for _, hname in ipairs(names) do
      local h = add_host(B, hname, nil, pport)
      if e.host then h.host = e.host end
      h.port, h.user, h.ssh = port, e.user, e.ssh
      if e.vars then for key, v in pairs(e.vars) do h.vars[key] = v end end
    end
  end
  for _, gname in ipairs(gnames) do
    for _, hp in ipairs(groups[gname].hosts or {}) do
      local names, port = expand_hostpattern(hp, format("%s: groups.%s.hosts", src, gname))
      for _, hname in ipairs(names) do add_host(B, hname, gname, port) end
    end
  end
  for _, hkey in ipairs(sorted_keys(hosts)) do
    for _, gname in ipairs(hosts[hkey].groups or {}) do
      if gname == "all" or gname == "ungrouped" then
        raise(format("%s: hosts.%s.groups: '%s' is implicit", src, hkey, gname))
      end
      add_group(B, gname)
      for _, hname in ipairs(expand_hostpattern(hkey, src)) do add_host(B, hname, gname) end
    end
  end
  for _, gname in ipairs(gnames) do
    for _, child in ipairs(groups[gname].children or {}) do
      if not I.groups[child] or child == "all" then
        raise(format("%s: groups.%s.children: unknown group '%s'", src, gname, child))
      end
      add_child(B, gname, child, format("%s: groups.%s.children", src, gname))
    end
  end
  return finish(B)
end

--- Build an inventory from the Lua form (a table as a Lua inventory file returns it).
-- @param t the table: `{hosts =, groups =, vars =, ssh =}`
-- @param source a name for messages (default "inventory")
-- @return inventory or nil, string, string
function M.from_table(t, source)
  return protect(build_from_table, t, source or "inventory")
end

local SAFE_GLOBALS = { "assert", "error", "ipairs", "next", "pairs", "pcall", "print", "rawequal", "rawget",
                       "rawlen", "rawset", "select", "setmetatable", "getmetatable", "tonumber", "tostring",
                       "type", "xpcall", "_VERSION" }
local SAFE_LIBS = { "string", "table", "math", "utf8" }

-- the environment a Lua inventory runs in: safe standard functions, `require` for kengine's own modules
-- (k.secret, k.secret_env), and an error for any other name
local function sandbox()
  local env = {}
  for _, name in ipairs(SAFE_GLOBALS) do env[name] = _G[name] end
  for _, name in ipairs(SAFE_LIBS) do
    local lib = {}
    for key, f in pairs(_G[name]) do lib[key] = f end
    env[name] = lib
  end
  env.os = { getenv = os.getenv, time = os.time, date = os.date, clock = os.clock }
  env.require = function(name)
    if name == "kengine" or (type(name) == "string" and name:match("^kengine%.")) or name == "cjson" then
      return require(name)
    end
    error("require '" .. tostring(name) .. "' is not allowed in an inventory", 2)
  end
  env._G = env
  return setmetatable(env, { __index = function(_, key)
    error("undefined variable '" .. tostring(key) .. "'", 2)
  end })
end

local function load_lua(text, path)
  text = text:gsub("^#[^\n]*", "")
  local fn, err = load(text, "@" .. path, "t", sandbox())
  if not fn then raise(err) end
  local ok, res = pcall(fn)
  if not ok then raise(tostring(res)) end
  if type(res) ~= "table" then raise(format("%s: the inventory must return a table, got %s", path, type(res))) end
  return build_from_table(res, path)
end

-- ---- loading files --------------------------------------------------------------------------------------

local function read_file(path)
  local f, err, errno = io.open(path, "rb")
  if not f then
    if errno == 2 then return nil, "ENOENT: " .. path .. ": no such file", "ENOENT" end
    if errno == 13 then return nil, "EACCES: " .. path .. ": permission denied", "EACCES" end
    return fail(tostring(err))
  end
  local text, rerr = f:read("a")
  f:close()
  if not text then
    return fail(format("%s: %s", path, tostring(rerr):find("directory") and
      "is a directory (give an inventory file)" or tostring(rerr)))
  end
  return text
end

local function looks_like_lua(text)
  local t = text:gsub("^#![^\n]*", ""):gsub("^%s+", "")
  return t:match("^return[%s{(]") ~= nil or t:match("^%-%-") ~= nil or t:match("^local%s") ~= nil
end

local function detect(path, text)
  local ext = (path:match("%.([%w]+)$") or ""):lower()
  if ext == "lua" then return "lua" end
  if ext == "yml" or ext == "yaml" or ext == "json" then return "yaml" end
  if ext == "ini" then return "ini" end
  if looks_like_lua(text) then return "lua" end
  -- as Ansible does for a file without a known extension: YAML if it reads as a YAML mapping, else INI
  local ok, root = pcall(yaml_compose, text, path)
  if ok and root and root.kind == "map" then return "yaml" end
  return "ini"
end

--- Read an inventory file: kengine's Lua form (`.lua`, or a file that starts like Lua), Ansible YAML
-- (`.yml`, `.yaml`, `.json`) or Ansible INI (anything else that does not read as a YAML mapping).
-- @param path the file
-- @return inventory or nil, string, string (`EINVENTORY: file:line: message`, `ENOENT`, `EACCES`)
function M.load(path)
  if type(path) ~= "string" then error("bad argument #1 to 'load' (string expected, got " .. type(path) .. ")", 2) end
  local text, err, code = read_file(path)
  if not text then return nil, err, code end
  local kind = detect(path, text)
  if kind == "lua" then return protect(load_lua, text, path) end
  if kind == "yaml" then return protect(parse_yaml, text, path) end
  return protect(parse_ini, text, path)
end

--- Read an inventory from a string (format: "lua", "yaml" or "ini").
-- @return inventory or nil, string, string
function M.parse(text, fmt, source)
  source = source or "inventory"
  if fmt == "lua" then return protect(load_lua, text, source) end
  if fmt == "yaml" then return protect(parse_yaml, text, source) end
  if fmt == "ini" then return protect(parse_ini, text, source) end
  error("bad argument #2 to 'parse' (\"lua\", \"yaml\" or \"ini\" expected)", 2)
end

-- ---- host patterns --------------------------------------------------------------------------------------

-- fnmatch.translate as a Lua pattern
local function glob_to_pattern(glob)
  local out, i, n = { "^" }, 1, #glob
  while i <= n do
    local c = glob:sub(i, i)
    if c == "*" then out[#out + 1] = ".*"
    elseif c == "?" then out[#out + 1] = "."
    elseif c == "[" then
      local j = i + 1
      if glob:sub(j, j) == "!" then j = j + 1 end
      if glob:sub(j, j) == "]" then j = j + 1 end
      local close = glob:find("]", j, true)
      if not close then out[#out + 1] = "%["
      else
        local body = glob:sub(i + 1, close - 1)
        local neg = body:sub(1, 1) == "!"
        if neg then body = body:sub(2) end
        body = body:gsub("[%%%]%^]", "%%%0"):gsub("^%%%^", "%%^")
        out[#out + 1] = "[" .. (neg and "^" or "") .. body .. "]"
        i = close
      end
    else
      out[#out + 1] = c:match("%W") and ("%" .. c) or c
    end
    i = i + 1
  end
  out[#out + 1] = "$"
  return concat(out)
end

local function split_pattern(pattern)
  local parts = {}
  if pattern:find(",", 1, true) then
    for p in (pattern .. ","):gmatch("([^,]*),") do parts[#parts + 1] = p end
  elseif parse_address(pattern) then
    parts[1] = pattern
  else
    local cur, i, n = {}, 1, #pattern
    while i <= n do
      local c = pattern:sub(i, i)
      if c == "[" then
        local j = pattern:find("]", i + 1, true) or n
        cur[#cur + 1] = pattern:sub(i, j)
        i = j
      elseif c == ":" then
        parts[#parts + 1] = concat(cur); cur = {}
      else
        cur[#cur + 1] = c
      end
      i = i + 1
    end
    parts[#parts + 1] = concat(cur)
  end
  local out = {}
  for _, p in ipairs(parts) do
    p = strip(p)
    if p ~= "" then out[#out + 1] = p end
  end
  return out
end

-- the hosts of a group and of its descendants, in inventory order
local function group_hosts(I, gname, out, seen)
  local queue, qseen = { gname }, { [gname] = true }
  local i = 1
  while queue[i] do
    for _, c in ipairs(I.groups[queue[i]].children) do
      if not qseen[c] then qseen[c] = true; queue[#queue + 1] = c end
    end
    i = i + 1
  end
  for _, g in ipairs(queue) do
    for _, h in ipairs(I.groups[g].hosts) do
      if not seen[h] then seen[h] = true; out[#out + 1] = h end
    end
  end
  if gname == "all" then
    for _, h in ipairs(I.host_order) do
      if not seen[h] then seen[h] = true; out[#out + 1] = h end
    end
  end
end

local function match_term(I, term)
  if I.hosts[term] then return { term } end
  local base, idx = term:match("^(.+)%[(%-?%d+)%]$")
  local from, to
  if not base then
    base, from, to = term:match("^(.+)%[(%d+)[:-](%d*)%]$")
  end
  base = base or term
  if base:sub(1, 1) == "~" then
    return nil, format("regular expression patterns are not supported: '%s'", term)
  end
  local lp = glob_to_pattern(base)
  local out, seen = {}, {}
  local matched_group = false
  for _, gname in ipairs(I.group_order) do
    if gname:match(lp) then
      matched_group = true
      group_hosts(I, gname, out, seen)
    end
  end
  if not matched_group or base:find("[.?*%[]") then
    for _, hname in ipairs(I.host_order) do
      if not seen[hname] and hname:match(lp) then seen[hname] = true; out[#out + 1] = hname end
    end
  end
  if not matched_group and #out == 0 then return nil, format("no host or group matches '%s'", term) end
  if idx then
    local k = tonumber(idx)
    if k < 0 then k = #out + k end
    return { out[k + 1] }
  elseif from then
    local a, b = tonumber(from), tonumber(to ~= "" and to or -1)
    if b == -1 then b = #out - 1 end
    if b == 0 then b = a end
    local sub = {}
    for k = a + 1, math.min(b + 1, #out) do sub[#sub + 1] = out[k] end
    return sub
  end
  return out
end

--- The hosts that an Ansible host pattern selects.
-- `all` or `*`; a host or group name (a group includes the hosts of its child groups); globs (`web*`);
-- `a:b` or `a,b` (union), `a:&b` (intersection), `a:!b` (exclusion); `group[0]`, `group[0:2]` subscripts.
-- @param I the inventory
-- @param pattern a string, or a list of patterns (their union)
-- @return sorted list of host names or nil, string, string
function M.select(I, pattern)
  if pattern == nil then pattern = "all" end
  if type(pattern) == "table" then pattern = concat(pattern, ",") end
  if type(pattern) ~= "string" then
    error("bad argument #2 to 'select' (string expected, got " .. type(pattern) .. ")", 2)
  end
  local terms = split_pattern(pattern)
  if #terms == 0 then return fail("empty host pattern") end
  local regular, inter, excl = {}, {}, {}
  for _, t in ipairs(terms) do
    local c = t:sub(1, 1)
    local list = c == "!" and excl or c == "&" and inter or regular
    list[#list + 1] = t
  end
  if #regular == 0 then regular[1] = "all" end
  local hosts, have = {}, {}
  local function each(list, fn)
    for _, t in ipairs(list) do
      local name = (t:sub(1, 1) == "!" or t:sub(1, 1) == "&") and t:sub(2) or t
      local matched, err = match_term(I, name)
      if not matched then return err end
      fn(matched)
    end
  end
  local err = each(regular, function(m)
    for _, h in ipairs(m) do
      if not have[h] then have[h] = true; hosts[#hosts + 1] = h end
    end
  end) or each(inter, function(m)
    local keep = {}
    for _, h in ipairs(m) do keep[h] = true end
    for h in pairs(have) do if not keep[h] then have[h] = nil end end
  end) or each(excl, function(m)
    for _, h in ipairs(m) do have[h] = nil end
  end)
  if err then return fail(err) end
  local out = {}
  for _, h in ipairs(hosts) do if have[h] then out[#out + 1] = h end end
  sort(out)
  return out
end

-- ---- variables and connections --------------------------------------------------------------------------

-- the groups whose vars a host gets (not `all`), in Ansible's merge order: (depth, priority, name)
local function var_groups(I, h)
  local seen, list = {}, {}
  local function walk(gname)
    if seen[gname] or gname == "all" then return end
    seen[gname] = true
    list[#list + 1] = I.groups[gname]
    for _, p in ipairs(I.groups[gname].parents) do walk(p) end
  end
  for _, g in ipairs(h.groups) do walk(g) end
  sort(list, function(a, b)
    if a.depth ~= b.depth then return a.depth < b.depth end
    if a.priority ~= b.priority then return a.priority < b.priority end
    return a.name < b.name
  end)
  return list
end

-- a host's own host/port/user (the Lua form's fields) as ansible_host/ansible_port/ansible_user in v
local function reflect(h, v)
  local own = h.vars
  if h.host ~= h.name and own.ansible_host ~= h.host then v.ansible_host = h.host end
  local op = own.ansible_port
  if h.port and not ((type(op) == "number" or type(op) == "string") and tonumber(op) == h.port) then
    v.ansible_port = h.port
  end
  if h.user and own.ansible_user ~= h.user then v.ansible_user = h.user end
  return v
end

local function unknown_host(name)
  return fail(format("unknown host '%s'", tostring(name)))
end

--- A host's variables: `I.vars` < group vars (by depth from `all`, then `ansible_group_priority`, then
-- name: parents before children) < the host's own vars.  A host's own `host`, `port` and `user` (Lua form)
-- show as `ansible_host`, `ansible_port`, `ansible_user`.  Tables are copies; secrets are kept as they are.
-- @return table or nil, string, string
function M.host_vars(I, name)
  local h = I.hosts[name]
  if not h then return unknown_host(name) end
  local v = {}
  for key, x in pairs(I.vars) do v[key] = x end
  for _, g in ipairs(var_groups(I, h)) do
    for key, x in pairs(g.vars) do v[key] = x end
  end
  for key, x in pairs(h.vars) do v[key] = x end
  reflect(h, v)
  return deep_copy(v)
end

local function truthy(v)
  if type(v) == "boolean" then return v end
  if type(v) == "number" then return v ~= 0 end
  if type(v) == "string" then
    local l = v:lower()
    if l == "yes" or l == "true" or l == "on" or l == "1" or l == "y" or l == "t" then return true end
    if l == "no" or l == "false" or l == "off" or l == "0" or l == "n" or l == "f" or l == "" then return false end
  end
  return nil
end

local function first_of(v, ...)
  for i = 1, select("#", ...) do
    local x = v[(select(i, ...))]
    if x ~= nil and x ~= NULL then return x end
  end
  return nil
end

--- How to reach a host: `I.ssh` (defaults) < Ansible connection vars from any level (`ansible_host`,
-- `ansible_port`, `ansible_user`, `ansible_ssh_private_key_file` -> identity, `ansible_password`,
-- `ansible_become` -> sudo, `ansible_become_password` -> sudo_password,
-- `ansible_host_key_checking` = false -> host_key "off") < the host's own `ssh` table (Lua form).
-- @return {host=, port=, user=, identity=, ...} or nil, string, string
function M.connection(I, name)
  local h = I.hosts[name]
  if not h then return unknown_host(name) end
  local v = M.host_vars(I, name)
  local c = {}
  for key, x in pairs(I.ssh) do c[key] = x end
  local host = first_of(v, "ansible_host", "ansible_ssh_host")
  c.host = type(host) == "string" and host or h.name
  c.port = port_of(first_of(v, "ansible_port", "ansible_ssh_port")) or port_of(c.port)
  local user = first_of(v, "ansible_user", "ansible_ssh_user")
  if user ~= nil then c.user = tostring(user) end
  local identity = first_of(v, "ansible_ssh_private_key_file", "ansible_private_key_file")
  if identity ~= nil then c.identity = identity end
  local password = first_of(v, "ansible_password", "ansible_ssh_pass", "ansible_ssh_password")
  if password ~= nil then c.password = password end
  local become = truthy(first_of(v, "ansible_become", "ansible_sudo"))
  if become ~= nil then c.sudo = become end
  local sudo_password = first_of(v, "ansible_become_password", "ansible_become_pass", "ansible_sudo_pass")
  if sudo_password ~= nil then c.sudo_password = sudo_password end
  local checking = truthy(first_of(v, "ansible_host_key_checking", "ansible_ssh_host_key_checking"))
  if checking == false then c.host_key = "off" end
  if h.ssh then
    for key, x in pairs(h.ssh) do c[key] = x end
    if h.ssh.port then c.port = port_of(h.ssh.port) end
  end
  return c
end

-- ---- ansible-inventory's output ---------------------------------------------------------------------------

-- magic variables ansible-inventory leaves out of its output
local INTERNAL_VARS = {}
for _, name in ipairs({ "ansible_diff_mode", "ansible_config_file", "ansible_facts", "ansible_forks",
  "ansible_inventory_sources", "ansible_limit", "ansible_playbook_python", "ansible_run_tags",
  "ansible_skip_tags", "ansible_verbosity", "ansible_version", "inventory_dir", "inventory_file",
  "inventory_hostname", "inventory_hostname_short", "groups", "group_names", "omit", "playbook_dir" }) do
  INTERNAL_VARS[name] = true
end

local function output_vars(v)
  local out = {}
  for key, x in pairs(v) do
    if not INTERNAL_VARS[key] then out[key] = plain(x) end
  end
  return out
end

--- The variables `ansible-inventory -i FILE --host NAME` prints (secrets as "***").
-- @param opts `{export = true}`: only the host's own variables, as `--export`
-- @return table or nil, string, string
function M.ansible_host(I, name, opts)
  local h = I.hosts[name]
  if not h then return unknown_host(name) end
  if opts and opts.export then
    return output_vars(reflect(h, deep_copy(h.vars)))
  end
  return output_vars(M.host_vars(I, name))
end

--- The table `ansible-inventory -i FILE --list` prints: `_meta.hostvars`, then every group reachable from
-- `all` as `{hosts = [...], children = [...]}`, empty keys and empty groups left out, as ansible-core 2.14.
-- @param opts `{export = true}` as `--export`: group vars under each group, hosts' own vars only
-- @return table
function M.ansible_list(I, opts)
  local export = opts and opts.export
  local results, seen = {}, {}
  local function format_group(gname)
    local g = I.groups[gname]
    local r = {}
    if gname ~= "all" and #g.hosts > 0 then
      r.hosts = array({ table.unpack(g.hosts) })
    end
    if #g.children > 0 then r.children = array({ table.unpack(g.children) }) end
    for _, c in ipairs(g.children) do
      if not seen[c] then
        format_group(c)
        seen[c] = true
      end
    end
    if export then
      local v = output_vars(g.vars)
      if g.priority ~= 1 then v.ansible_group_priority = g.priority end
      if next(v) ~= nil then r.vars = v end
    end
    if next(r) ~= nil then results[gname] = r end
  end
  format_group("all")
  local hostvars = {}
  local hosts = {}
  group_hosts(I, "all", hosts, {})
  for _, hname in ipairs(hosts) do
    local v = M.ansible_host(I, hname, opts)
    if next(v) ~= nil then hostvars[hname] = v end
  end
  results._meta = { hostvars = hostvars }
  return results
end

--- The text `ansible-inventory --graph [GROUP]` prints.
-- @return string or nil, string, string
function M.graph(I, gname)
  gname = gname or "all"
  if not I.groups[gname] then return fail(format("no group '%s'", tostring(gname))) end
  local lines = {}
  local function name(s, depth)
    lines[#lines + 1] = depth > 0 and (("  |"):rep(depth) .. "--" .. s) or s
  end
  local function walk(g, depth)
    name("@" .. g .. ":", depth)
    for _, c in ipairs(I.groups[g].children) do walk(c, depth + 1) end
    if g ~= "all" then
      for _, h in ipairs(I.groups[g].hosts) do name(h, depth + 1) end
    end
  end
  walk(gname, 0)
  return concat(lines, "\n")
end

-- ---- `kengine inventory` ----------------------------------------------------------------------------------

M.HELP = [[
usage: kengine inventory -i FILE (--list | --host NAME | --graph [GROUP]) [--export]

Reads an inventory (kengine's Lua form, or an Ansible INI or YAML inventory)
and prints it the way `ansible-inventory` does, so you can check how kengine
reads it, or compare it with Ansible's own reading:

  --list          every group and every host's variables, as JSON
  --host NAME     one host's variables (all levels merged), as JSON
  --graph [GROUP] the tree of groups and hosts (from GROUP, default all)
  --export        with --list: group variables under their groups, hosts'
                  own variables only (as ansible-inventory --export)
  -i, --inventory FILE   the inventory (default: $KENGINE_INVENTORY)

Secrets print as "***". Exit status: 0 success, 1 the inventory could not be
read or the host or group is unknown, 2 a usage error.
]]

local function usage_error(msg)
  io.stderr:write("kengine inventory: ", msg, "\n", "Try 'kengine inventory --help'.\n")
  return 2
end

--- `kengine inventory ARGS`: returns the exit status.
-- @param args the arguments after `inventory`
-- @return 0, 1 or 2
function M.cli(args)
  local o = { export = false }
  local actions = {}
  local i = 1
  local function value(opt)
    i = i + 1
    local v = args[i]
    if v == nil then return nil, usage_error(opt .. " needs a value") end
    return v
  end
  while i <= #args do
    local a = args[i]
    local opt, inline = a:match("^(%-%-[%w-]+)=(.*)$")
    if opt then a = opt end
    local function get(name)
      if inline then return inline end
      local v, status = value(name)
      if not v then return nil, status end
      return v
    end
    if a == "-i" or a == "--inventory" or a == "--inventory-file" then
      local v, status = get(a)
      if not v then return status end
      o.inventory = v
    elseif a:match("^%-i.") then
      o.inventory = a:sub(3)
    elseif a == "--list" then
      actions[#actions + 1] = "list"
    elseif a == "--host" then
      local v, status = get(a)
      if not v then return status end
      o.host = v
      actions[#actions + 1] = "host"
    elseif a == "--graph" then
      actions[#actions + 1] = "graph"
    elseif a == "--export" then
      o.export = true
    elseif a:sub(1, 1) == "-" and a ~= "-" then
      return usage_error("unknown option '" .. a .. "'")
    elseif o.group == nil then
      o.group = a
    else
      return usage_error("unexpected argument '" .. a .. "'")
    end
    i = i + 1
  end
  if #actions ~= 1 then return usage_error("give one of --list, --host NAME or --graph") end
  local action = actions[1]
  if o.group and action ~= "graph" then return usage_error("unexpected argument '" .. o.group .. "'") end
  o.inventory = o.inventory or os.getenv("KENGINE_INVENTORY")
  if not o.inventory then return usage_error("missing -i FILE") end

  local I, err = M.load(o.inventory)
  if not I then
    io.stderr:write("kengine inventory: ", err, "\n")
    return 1
  end
  for _, w in ipairs(I.warnings) do io.stderr:write("kengine inventory: warning: ", w, "\n") end
  local text
  if action == "list" then
    text = M.to_json(M.ansible_list(I, o))
  elseif action == "host" then
    local names, serr = M.select(I, o.host)
    if not names then
      io.stderr:write("kengine inventory: ", serr, "\n")
      return 1
    end
    if #names ~= 1 then
      io.stderr:write(format("kengine inventory: --host: '%s' matches %d hosts, give one host\n", o.host, #names))
      return 1
    end
    text = M.to_json(M.ansible_host(I, names[1], o))
  else
    local g, gerr = M.graph(I, o.group)
    if not g then
      io.stderr:write("kengine inventory: --graph: ", gerr, "\n")
      return 1
    end
    text = g
  end
  io.stdout:write(text, "\n")
  return 0
end

return M
