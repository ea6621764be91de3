--- line and block: edit part of a file, leave the rest alone.
-- h:line{ path=, line=, regexp= (Lua pattern of the line to replace),
--         insert_after= / insert_before= (Lua pattern; default: end of file), state="present"|"absent",
--         create=false, mode= }
-- h:block{ path=, block= (text), marker="# {mark} MANAGED BY KENGINE", insert_after= / insert_before=,
--          state="present"|"absent", create=true, mode= }
-- Both read the file, compute the new content locally, and write it back
-- atomically only when it differs.
local recipe = require "kengine.recipe"

local function split_lines(s)
  local t = {}
  if s == nil or s == "" then return t end
  for l in (s:sub(-1) == "\n" and s or s .. "\n"):gmatch("(.-)\n") do t[#t + 1] = l end
  return t
end

local function join(lines) return #lines == 0 and "" or table.concat(lines, "\n") .. "\n" end

local function read(h, path)
  local st = recipe.resources.file.probe(h, { path = path })
  if st.exists and not st.kind:match("regular") then error(path .. " is not a regular file", 0) end
  return st
end

local function find(lines, pattern, last)
  local found
  for i, l in ipairs(lines) do
    if l:find(pattern) then
      found = i
      if not last then return found end
    end
  end
  return found
end

local function check_pattern(p, key)
  if p[key] ~= nil then
    local ok = pcall(string.find, "", p[key])
    if not ok then return false, key .. " is not a valid Lua pattern: " .. tostring(p[key]) end
  end
  return true
end

-- present without create = true needs the file to be there already
local function must_exist(p, st)
  if not st.exists and p.state == "present" and not p.create then
    error(p.path .. " does not exist (create = true to create it)", 0)
  end
end

local function changes_for(st, new, p)
  local old = st.content or ""
  if st.exists and old == new then return nil end
  if not st.exists and p.state == "absent" then return nil end
  return { summary = st.exists and "edit" or "create", before = old, after = new, new = new }
end

local function apply(h, p, _, changes)
  h:write(p.path, changes.new, { mode = p.mode })
end

recipe.resource {
  name = "line",
  description = "one line in a file, matched by a Lua pattern",
  defaults = { state = "present" },
  label = function(p) return p.path end,
  validate = function(p)
    if type(p.path) ~= "string" then return false, "path is required" end
    if p.state == "present" and type(p.line) ~= "string" then return false, "line is required" end
    if p.state == "absent" and not (p.regexp or p.line) then return false, "regexp or line is required" end
    for _, key in ipairs({ "regexp", "insert_after", "insert_before" }) do
      local ok, msg = check_pattern(p, key)
      if not ok then return false, msg end
    end
    return true
  end,
  probe = function(h, p) return read(h, p.path) end,
  diff = function(_, p, st)
    must_exist(p, st)
    local lines = split_lines(st.content)
    local function matches(l)
      if p.regexp then return l:find(p.regexp) ~= nil end
      return l == p.line
    end
    if p.state == "absent" then
      local out = {}
      for _, l in ipairs(lines) do if not matches(l) then out[#out + 1] = l end end
      return changes_for(st, join(out), p)
    end
    local idx = find(lines, p.regexp or ("^" .. p.line:gsub("%p", "%%%0") .. "$"), true)
    if idx then
      lines[idx] = p.line
    elseif p.insert_before then
      local at = find(lines, p.insert_before)
      table.insert(lines, at or #lines + 1, p.line)
    elseif p.insert_after then
      local at = find(lines, p.insert_after, true)
      table.insert(lines, at and at + 1 or #lines + 1, p.line)
    else
      lines[#lines + 1] = p.line
    end
    return changes_for(st, join(lines), p)
  end,
  apply = apply,
}

recipe.resource {
  name = "block",
  description = "a block of lines between markers",
  defaults = { state = "present", marker = "# {mark} MANAGED BY KENGINE", create = true },
  label = function(p) return p.path end,
  validate = function(p)
    if type(p.path) ~= "string" then return false, "path is required" end
    if p.state == "present" and type(p.block) ~= "string" then return false, "block is required" end
    if not p.marker:find("{mark}", 1, true) then return false, "marker must contain {mark}" end
    for _, key in ipairs({ "insert_after", "insert_before" }) do
      local ok, msg = check_pattern(p, key)
      if not ok then return false, msg end
    end
    return true
  end,
  probe = function(h, p) return read(h, p.path) end,
  diff = function(_, p, st)
    must_exist(p, st)
    local lines = split_lines(st.content)
    local b = p.marker:gsub("{mark}", "BEGIN")
    local e = p.marker:gsub("{mark}", "END")
    local s_idx, e_idx
    for i, l in ipairs(lines) do
      if l == b then s_idx = i elseif l == e and s_idx then e_idx = i; break end
    end
    local out = {}
    if s_idx and e_idx then
      for i = 1, s_idx - 1 do out[#out + 1] = lines[i] end
      if p.state == "present" then
        out[#out + 1] = b
        for _, l in ipairs(split_lines(p.block)) do out[#out + 1] = l end
        out[#out + 1] = e
      end
      for i = e_idx + 1, #lines do out[#out + 1] = lines[i] end
    else
      if p.state == "absent" then return nil end
      out = lines
      local new = { b }
      for _, l in ipairs(split_lines(p.block)) do new[#new + 1] = l end
      new[#new + 1] = e
      local at = #out + 1
      if p.insert_before then
        at = find(out, p.insert_before) or at
      elseif p.insert_after then
        local a = find(out, p.insert_after, true)
        at = a and a + 1 or at
      end
      for i, l in ipairs(new) do table.insert(out, at + i - 1, l) end
    end
    return changes_for(st, join(out), p)
  end,
  apply = apply,
}

return recipe.resources.line
