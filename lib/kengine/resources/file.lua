--- file: a file's content, mode and owner, written atomically.
-- h:file{ path=, content= (string or secret), mode="0644", owner=, group=, state="present"|"absent" }
local recipe = require "kengine.recipe"
local secret = require "kengine.secret"
local quote = require("kengine.host").quote

local function norm_mode(m)
  if m == nil then return nil end
  m = tostring(m):gsub("^0+(%d%d%d)$", "%1")
  return m
end

return recipe.resource {
  name = "file",
  description = "a file with given content, mode and owner",
  defaults = { state = "present" },
  label = function(p) return p.path end,
  validate = function(p)
    if type(p.path) ~= "string" or p.path:sub(1, 1) ~= "/" then return false, "path must be an absolute path" end
    if p.state ~= "present" and p.state ~= "absent" then return false, "state must be 'present' or 'absent'" end
    if p.mode ~= nil and not tostring(p.mode):match("^0?[0-7][0-7][0-7]$") then
      return false, "mode must be octal like '0644', got '" .. tostring(p.mode) .. "'"
    end
    if p.state == "present" and p.content == nil then return false, "content is required" end
    if p.content ~= nil and type(p.content) ~= "string" and not secret.is(p.content) then
      return false, "content must be a string or a secret"
    end
    return true
  end,

  -- one round trip: stat line, then the content of a regular file
  probe = function(h, p)
    local path = quote(p.path)
    local r = h:raw("stat -c '%a %U %G %F' -- " .. path .. " 2>/dev/null || exit 3; " ..
      "if [ -f " .. path .. " ]; then cat -- " .. path .. "; fi")
    if r.code == 3 then return { exists = false } end
    if r.code ~= 0 then error("cannot read " .. p.path .. ": " .. r.stderr, 0) end
    local head, content = r.stdout:match("^([^\n]*)\n(.*)$")
    local mode, owner, group, kind = head:match("^(%d+) (%S+) (%S+) (.+)$")
    return { exists = true, mode = mode, owner = owner, group = group, kind = kind,
      content = kind:match("regular") and content or nil }
  end,

  diff = function(_, p, st)
    if p.state == "absent" then
      if not st.exists then return nil end
      return { summary = "remove", before = st.content or "", after = "", fields = { state = "absent" } }
    end
    local want = secret.reveal(p.content)
    local fields, what = {}, {}
    if not st.exists then
      what[#what + 1] = "create"
    elseif not st.kind:match("regular") then
      return { summary = "replace " .. st.kind .. " with a file", before = "", after = want }
    else
      if st.content ~= want then fields.content = true; what[#what + 1] = "content" end
      if p.mode and norm_mode(p.mode) ~= st.mode then
        fields.mode = { st.mode, norm_mode(p.mode) }; what[#what + 1] = "mode " .. st.mode .. " → " .. norm_mode(p.mode)
      end
      if p.owner and p.owner ~= st.owner then
        fields.owner = { st.owner, p.owner }; what[#what + 1] = "owner " .. st.owner .. " → " .. p.owner
      end
      if p.group and p.group ~= st.group then
        fields.group = { st.group, p.group }; what[#what + 1] = "group " .. st.group .. " → " .. p.group
      end
    end
    if #what == 0 then return nil end
    return { summary = table.concat(what, ", "), before = st.content or "", after = want, fields = fields }
  end,

  apply = function(h, p, st, changes)
    if p.state == "absent" then
      local r = h:raw("rm -f -- " .. quote(p.path))
      if r.code ~= 0 then error("cannot remove " .. p.path .. ": " .. r.stderr, 0) end
      return
    end
    local f = changes.fields or {}
    if not st.exists or f.content or not f.mode and not f.owner and not f.group then
      h:write(p.path, p.content, { mode = p.mode and norm_mode(p.mode), owner = p.owner, group = p.group })
      return
    end
    local cmds = {}
    if f.mode then cmds[#cmds + 1] = "chmod " .. norm_mode(p.mode) .. " -- " .. quote(p.path) end
    if f.owner or f.group then
      cmds[#cmds + 1] = "chown " .. quote((p.owner or "") .. (p.group and (":" .. p.group) or "")) .. " -- " ..
        quote(p.path)
    end
    local r = h:raw(table.concat(cmds, " && "))
    if r.code ~= 0 then error("cannot change " .. p.path .. ": " .. r.stderr, 0) end
  end,
}
