--- file: a file, directory or symlink with its mode and owner; or nothing at a path.
-- h:file{ path=, state="present"|"directory"|"link"|"absent",
--         content= (string or secret) or source= (a file on the controller),   -- state "present"
--         src= (the link's target),                                            -- state "link"
--         mode="0644", owner=, group=, recursive=false (directory: owner/group/mode for everything below),
--         parents=false (create missing parent directories), backup=false (keep the old content as
--         path.<timestamp>~ on the target; the step result's `backup` names it),
--         force=false (replace a directory or a non-link by a link/file; remove a non-empty directory) }
-- Content lands atomically (h:write: temp file beside it, then rename); one round trip probes the path.
local recipe = require "kengine.recipe"
local secret = require "kengine.secret"
local quote = require("kengine.host").quote

local STATES = { present = true, directory = true, link = true, absent = true }

-- "0644", "644", 420 -> "644" (how `stat -c %a` shows it)
local function norm_mode(m)
  if m == nil then return nil end
  local n = tonumber(tostring(m), 8)
  return n and string.format("%o", n) or tostring(m)
end

local function dirname(path) return path:match("^(.*)/[^/]*$") or "/" end

local function is_file(st) return st.kind and st.kind:match("regular") ~= nil end
local function is_dir(st) return st.kind == "directory" end
local function is_link(st) return st.kind == "symbolic link" end

-- the wanted content: content, or the source file read on the controller
local function wanted(p)
  if p.content ~= nil then return secret.reveal(p.content) end
  if p._source == nil then
    local f, err = io.open(p.source, "rb")
    if not f then error("file: cannot read source " .. err, 0) end
    p._source = f:read("a")
    f:close()
  end
  return p._source
end

local function validate(p)
  if type(p.path) ~= "string" or p.path:sub(1, 1) ~= "/" then return false, "path must be an absolute path" end
  if p.path:find("\n", 1, true) then return false, "path must not contain a newline" end
  if not STATES[p.state] then
    return false, "state must be 'present', 'directory', 'link' or 'absent', got '" .. tostring(p.state) .. "'"
  end
  if p.mode ~= nil and not tostring(p.mode):match("^0?[0-7]?[0-7][0-7][0-7]$") then
    return false, "mode must be octal like '0644', got '" .. tostring(p.mode) .. "'"
  end
  if p.content ~= nil and type(p.content) ~= "string" and not secret.is(p.content) then
    return false, "content must be a string or a secret"
  end
  if p.source ~= nil and type(p.source) ~= "string" then return false, "source must be a local file path" end
  if p.state == "present" then
    if p.content == nil and p.source == nil then return false, "content or source is required" end
    if p.content ~= nil and p.source ~= nil then return false, "give either content or source, not both" end
  elseif p.content ~= nil or p.source ~= nil then
    return false, "content and source only go with state 'present'"
  end
  if p.state == "link" then
    if type(p.src) ~= "string" or p.src == "" then return false, "src (the link's target) is required" end
    if p.mode ~= nil then return false, "mode does not apply to a symlink" end
  elseif p.src ~= nil then
    return false, "src only goes with state 'link' (a local file to copy is source)"
  end
  if p.recursive and p.state ~= "directory" then return false, "recursive only goes with state 'directory'" end
  for _, key in ipairs({ "owner", "group" }) do
    if p[key] ~= nil and (type(p[key]) ~= "string" or not p[key]:match("^[%w_.][%w_.%-]*%$?$")) then
      return false, key .. " must be a user or group name, got '" .. tostring(p[key]) .. "'"
    end
  end
  return true
end

-- One round trip: whether the parent exists, the stat line, then by kind the
-- link target, whether a directory is empty (and, with recursive, whether
-- anything below differs), or a regular file's content.
local function probe(h, p)
  local path = quote(p.path)
  local want_content = p.state == nil or p.state == "present" or p.state == "absent"
  local deep = "echo same"
  if p.recursive and (p.owner or p.group or p.mode) then
    local tests = {}
    if p.owner then tests[#tests + 1] = "! -user " .. quote(p.owner) end
    if p.group then tests[#tests + 1] = "! -group " .. quote(p.group) end
    if p.mode then tests[#tests + 1] = "! -perm " .. norm_mode(p.mode) end
    deep = "if [ -n \"$(find \"$p\" -mindepth 1 \\( " .. table.concat(tests, " -o ") ..
      " \\) -print -quit)\" ]; then echo differs; else echo same; fi"
  end
  local r = h:raw(table.concat({
    "p=" .. path,
    "if [ -d \"$(dirname -- \"$p\")\" ]; then echo parent; else echo noparent; fi",
    "s=$(stat -c '%a %U %G %F' -- \"$p\" 2>/dev/null) || { echo absent; exit 0; }",
    "echo \"$s\"",
    "if [ -L \"$p\" ]; then readlink -- \"$p\" || exit 4",
    "elif [ -d \"$p\" ]; then if [ -z \"$(ls -A -- \"$p\")\" ]; then echo empty; else echo nonempty; fi; " .. deep,
    want_content and "elif [ -f \"$p\" ]; then cat -- \"$p\" || exit 4" or "",
    "fi",
  }, "\n"))
  if r.code ~= 0 then error("cannot read " .. p.path .. ": " .. r.stderr, 0) end
  local parent, head, rest = r.stdout:match("^(%S+)\n([^\n]*)\n?(.*)$")
  if not parent then error("cannot read " .. p.path .. ": unexpected output", 0) end
  local st = { parent = parent == "parent" }
  if head == "absent" then st.exists = false; return st end
  local mode, owner, group, kind = head:match("^(%d+) (%S+) (%S+) (.+)$")
  st.exists, st.mode, st.owner, st.group, st.kind = true, mode, owner, group, kind
  if is_link(st) then
    st.target = rest:gsub("\n$", "")
  elseif is_dir(st) then
    local empty, deep_state = rest:match("^(%S+)\n(%S+)")
    st.empty, st.deep_differs = empty == "empty", deep_state == "differs"
  elseif is_file(st) and want_content then
    st.content = rest
  end
  return st
end

-- owner/group/mode differences of an existing path
local function attr_changes(p, st, fields, what)
  if p.mode and p.state ~= "link" and norm_mode(p.mode) ~= st.mode then
    fields.mode = { st.mode, norm_mode(p.mode) }; what[#what + 1] = "mode " .. st.mode .. " → " .. norm_mode(p.mode)
  end
  if p.owner and p.owner ~= st.owner then
    fields.owner = { st.owner, p.owner }; what[#what + 1] = "owner " .. st.owner .. " → " .. p.owner
  end
  if p.group and p.group ~= st.group then
    fields.group = { st.group, p.group }; what[#what + 1] = "group " .. st.group .. " → " .. p.group
  end
end

-- what cannot be done without force, refused while diffing (so --check reports it too)
local function refuse(p, st, replacing)
  if is_dir(st) and not p.force then
    if replacing then error(p.path .. " is a directory (force = true to replace it)", 0) end
    if not st.empty then
      error(p.path .. " is a non-empty directory (force = true to remove it with everything in it)", 0)
    end
  end
  if replacing and p.state == "link" and not p.force then
    error(p.path .. " is a " .. st.kind .. " (force = true to replace it with a link)", 0)
  end
end

local function diff(_, p, st)
  local fields, what = {}, {}
  local state = p.state or "present"
  if state == "absent" then
    if not st.exists then return nil end
    refuse(p, st, false)
    local r = { summary = "remove " .. st.kind, fields = { state = { st.kind, "absent" } } }
    if is_file(st) then r.before, r.after = st.content or "", "" end
    return r
  end

  if state == "directory" then
    if not st.exists then
      return { summary = "create directory", fields = { state = { "absent", "directory" } } }
    elseif not is_dir(st) then
      refuse(p, st, true)
      return { summary = "replace " .. st.kind .. " with a directory", replace = true,
        fields = { state = { st.kind, "directory" } } }
    end
    attr_changes(p, st, fields, what)
    if st.deep_differs then fields.recursive = true; what[#what + 1] = "owner/group/mode below" end
    if #what == 0 then return nil end
    return { summary = table.concat(what, ", "), fields = fields }
  end

  if state == "link" then
    if not st.exists then
      return { summary = "link → " .. p.src, fields = { state = { "absent", "link" }, src = { "", p.src } } }
    elseif not is_link(st) then
      refuse(p, st, true)
      return { summary = "replace " .. st.kind .. " with a link → " .. p.src, replace = true,
        fields = { state = { st.kind, "link" }, src = { "", p.src } } }
    end
    if st.target ~= p.src then
      fields.src = { st.target, p.src }; what[#what + 1] = "link " .. st.target .. " → " .. p.src
    end
    attr_changes(p, st, fields, what)
    if #what == 0 then return nil end
    return { summary = table.concat(what, ", "), fields = fields }
  end

  local want = wanted(p)
  if not st.exists then
    return { summary = "create", before = "", after = want, fields = { state = { "absent", "file" } } }
  elseif not is_file(st) then
    refuse(p, st, true)
    return { summary = "replace " .. st.kind .. " with a file", before = "", after = want, replace = true,
      fields = { state = { st.kind, "file" } } }
  end
  if st.content ~= want then fields.content = true; what[#what + 1] = "content" end
  attr_changes(p, st, fields, what)
  if #what == 0 then return nil end
  return { summary = table.concat(what, ", "), before = st.content or "", after = want, fields = fields }
end

local function run(h, p, cmd, what)
  local r = h:raw(cmd)
  if r.code ~= 0 then error("cannot " .. what .. " " .. p.path .. ": " .. (r.stderr:gsub("%s+$", "")), 0) end
  return r
end

local function owner_spec(p)
  return quote((p.owner or "") .. (p.group and (":" .. p.group) or ""))
end

-- make room for a new kind of thing at path (diff refused what needs force)
local function clear(h, p, st)
  run(h, p, (is_dir(st) and "rm -rf -- " or "rm -f -- ") .. quote(p.path), "remove")
end

local function make_parents(h, p, st)
  if st.parent then return end
  if not p.parents then
    error("parent directory " .. dirname(p.path) .. " does not exist (parents = true to create it)", 0)
  end
  run(h, p, "mkdir -p -- " .. quote(dirname(p.path)), "create the parent directory of")
end

-- path.<timestamp>~ beside the file, not overwriting an earlier backup
local function backup(h, p)
  local r = run(h, p, "p=" .. quote(p.path) .. "; b=\"$p.$(date +%Y-%m-%d@%H:%M:%S)~\"; n=1; " ..
    "while [ -e \"$b\" ]; do b=\"$p.$(date +%Y-%m-%d@%H:%M:%S).$n~\"; n=$((n+1)); done; " ..
    "cp -p -- \"$p\" \"$b\" && printf '%s' \"$b\"", "back up")
  return r.stdout
end

local function apply(h, p, st, changes)
  local state = p.state or "present"
  local path = quote(p.path)
  local f = changes.fields or {}
  if state == "absent" then
    if is_dir(st) then
      run(h, p, (st.empty and "rmdir -- " or "rm -rf -- ") .. path, "remove")
    else
      run(h, p, "rm -f -- " .. path, "remove")
    end
    return
  end

  if st.exists and changes.replace then clear(h, p, st); st = { exists = false, parent = true } end
  if not st.exists then make_parents(h, p, st) end

  if state == "directory" then
    local cmds = {}
    if not st.exists then cmds[#cmds + 1] = "mkdir -- " .. path end
    if p.mode and (not st.exists or f.mode or f.recursive) then
      cmds[#cmds + 1] = "chmod " .. (p.recursive and "-R " or "") .. norm_mode(p.mode) .. " -- " .. path
    end
    if (p.owner or p.group) and (not st.exists or f.owner or f.group or f.recursive) then
      cmds[#cmds + 1] = "chown " .. (p.recursive and "-R " or "") .. owner_spec(p) .. " -- " .. path
    end
    run(h, p, table.concat(cmds, " && "), "create or change")
    return
  end

  if state == "link" then
    local cmds = {}
    if not st.exists or f.src then
      -- a new link beside it, renamed over the old one: never a moment without a link
      cmds[#cmds + 1] = "p=" .. path .. "; t=\"$(dirname -- \"$p\")/.kengine-link-$$\"; rm -f -- \"$t\"; " ..
        "ln -s -- " .. quote(p.src) .. " \"$t\" && mv -Tf -- \"$t\" \"$p\" || { rm -f -- \"$t\"; exit 1; }"
    end
    if p.owner or p.group then cmds[#cmds + 1] = "chown -h " .. owner_spec(p) .. " -- " .. path end
    run(h, p, table.concat(cmds, " && "), "link")
    return
  end

  local result
  if not st.exists or f.content or not f.mode and not f.owner and not f.group then
    if st.exists and p.backup and is_file(st) then
      result = { backup = backup(h, p) }
      result.msg = changes.summary .. " (backup " .. result.backup .. ")"
    end
    h:write(p.path, p.content or wanted(p), { mode = p.mode and norm_mode(p.mode), owner = p.owner, group = p.group })
    return result
  end
  local cmds = {}
  if f.mode then cmds[#cmds + 1] = "chmod " .. norm_mode(p.mode) .. " -- " .. path end
  if f.owner or f.group then cmds[#cmds + 1] = "chown " .. owner_spec(p) .. " -- " .. path end
  run(h, p, table.concat(cmds, " && "), "change")
end

return recipe.resource {
  name = "file",
  description = "a file, directory or symlink with given content, mode and owner; or nothing at a path",
  defaults = { state = "present" },
  label = function(p) return p.path end,
  validate = validate,
  probe = probe,
  diff = diff,
  apply = apply,
}
