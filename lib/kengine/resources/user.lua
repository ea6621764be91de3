--- user and group: local accounts, their groups, password hash and SSH keys.
-- h:user{ name=, uid=, group= (primary), groups={...} (supplementary), append=true (false: exactly these),
--         shell=, home=, create_home=true, system=false, password= (a crypt(3) hash, normally a k.secret),
--         state="present"|"absent", remove=false (absent: the home directory too),
--         authorized_keys={"ssh-ed25519 AAAA... comment", ...}, authorized_keys_exclusive=false }
-- h:group{ name=, gid=, system=false, state="present"|"absent" }
-- One round trip probes (getent passwd/group/shadow, id -Gn, ~/.ssh).  The
-- password hash travels on stdin only (to compare it and to `chpasswd -e`)
-- and is never printed.  authorized_keys is written atomically with .ssh 0700
-- and the file 0600, owned by the user; exclusive replaces the file, otherwise
-- missing keys are added (a key counts as present when its base64 blob is).
local recipe = require "kengine.recipe"
local secret = require "kengine.secret"
local hostmod = require "kengine.host"
local quote = hostmod.quote

local NAME = "^[%a_][%w_.%-]*%$?$"

local function valid_name(v) return type(v) == "string" and #v <= 32 and v:match(NAME) ~= nil end

local function is_int(v) return math.type(v) == "integer" and v >= 0 end

local function fail(msg) error(msg, 0) end

local function trim(s) return (s:gsub("%s+$", "")) end

local function run(h, what, cmd, stdin)
  local r = h:raw(cmd, { stdin = stdin })
  if r.code ~= 0 then fail(what .. " failed (exit " .. r.code .. "): " .. trim(r.stderr ~= "" and r.stderr or r.stdout)) end
  return r
end

local function set_of(list)
  local s = {}
  for _, v in ipairs(list) do s[v] = true end
  return s
end

local function words(s)
  local t = {}
  for w in (s or ""):gmatch("%S+") do t[#t + 1] = w end
  return t
end

-- groups = {"a","b"} or "a,b" -> sorted unique list
local function group_list(g)
  if g == nil then return nil end
  local list = type(g) == "string" and {} or g
  if type(g) == "string" then for w in g:gmatch("[^,%s]+") do list[#list + 1] = w end end
  local seen, out = {}, {}
  for _, v in ipairs(list) do
    if not seen[v] then seen[v] = true; out[#out + 1] = v end
  end
  table.sort(out)
  return out
end

-- authorized_keys = {"line", ...} or "line\nline" -> list of lines
local function key_list(k)
  if k == nil then return nil end
  if type(k) == "string" then
    local t = {}
    for l in k:gmatch("[^\n]+") do if l:match("%S") then t[#t + 1] = l end end
    return t
  end
  return k
end

-- the base64 blob identifies a key whatever its options and comment
local function key_blob(line)
  return line:match("%s(AAAA[%w+/]+=*)") or line:match("^(AAAA[%w+/]+=*)")
end

-- keys to manage: an exclusive list (even empty), or at least one key to add
local function manages_keys(p)
  local keys = key_list(p.authorized_keys)
  return keys ~= nil and (p.authorized_keys_exclusive or #keys > 0)
end

local function crypt_like(v)
  return v:match("^%$[%w]+%$[^%s:]+$") ~= nil or v:match("^[!*][^%s:]*$") ~= nil
end

------------------------------------------------------------------------------
-- user

local function validate_user(p)
  if not valid_name(p.name) then return false, "name must be a user name, got '" .. tostring(p.name) .. "'" end
  if p.state ~= "present" and p.state ~= "absent" then
    return false, "state must be 'present' or 'absent', got '" .. tostring(p.state) .. "'"
  end
  if p.uid ~= nil and not is_int(p.uid) then return false, "uid must be a non-negative integer" end
  if p.group ~= nil and not (valid_name(p.group) or is_int(p.group)) then
    return false, "group must be a group name or gid, got '" .. tostring(p.group) .. "'"
  end
  if p.groups ~= nil then
    if type(p.groups) ~= "table" and type(p.groups) ~= "string" then return false, "groups must be a list of names" end
    if type(p.groups) == "table" then
      for _, g in ipairs(p.groups) do
        if type(g) ~= "string" then return false, "groups must be a list of names" end
      end
    end
    for _, g in ipairs(group_list(p.groups)) do
      if not valid_name(g) then return false, "groups: '" .. tostring(g) .. "' is not a group name" end
    end
  end
  for _, key in ipairs({ "shell", "home" }) do
    local v = p[key]
    if v ~= nil and (type(v) ~= "string" or v:sub(1, 1) ~= "/" or v:find("[:\n]")) then
      return false, key .. " must be an absolute path"
    end
  end
  if p.password ~= nil then
    if type(p.password) ~= "string" and not secret.is(p.password) then
      return false, "password must be a crypt(3) hash string or a secret holding one"
    end
    if not crypt_like(secret.reveal(p.password)) then
      return false, "password must be a crypt(3) hash such as $y$... or $6$... (mkpasswd, openssl passwd -6), " ..
        "not a plain password"
    end
  end
  if p.authorized_keys ~= nil then
    local keys = key_list(p.authorized_keys)
    if type(keys) ~= "table" then return false, "authorized_keys must be a list of public key lines" end
    for i, l in ipairs(keys) do
      if type(l) ~= "string" or l:find("\n", 1, true) or not key_blob(l) then
        return false, "authorized_keys[" .. i .. "] is not a public key line ('ssh-ed25519 AAAA... comment')"
      end
    end
  end
  return true
end

-- one round trip; the wanted password hash (if any) comes in on stdin and
-- is compared there, so no hash ever comes back
local function probe_user(h, p)
  local lines = {
    "u=" .. quote(p.name),
    "pw=$(getent passwd \"$u\") || { echo absent; exit 0; }",
    "printf 'passwd %s\\n' \"$pw\"",
    "printf 'group %s\\n' \"$(id -gn -- \"$u\")\"",
    "printf 'groups %s\\n' \"$(id -Gn -- \"$u\")\"",
  }
  local stdin
  if p.password ~= nil then
    stdin = p.password .. "\n"
    lines[#lines + 1] = "IFS= read -r want; s=$(getent shadow \"$u\" | cut -d: -f2); " ..
      "if [ \"$s\" = \"$want\" ]; then echo 'password same'; else echo 'password differs'; fi"
  end
  if manages_keys(p) then
    lines[#lines + 1] = (p.home and ("home=" .. quote(p.home)) or "home=$(printf '%s' \"$pw\" | cut -d: -f6)")
    lines[#lines + 1] = "if [ -d \"$home/.ssh\" ]; then printf 'sshdir %s\\n' \"$(stat -c '%a %U %G' \"$home/.ssh\")\"; fi"
    lines[#lines + 1] = "k=\"$home/.ssh/authorized_keys\"; if [ -f \"$k\" ]; then " ..
      "printf 'keysfile %s\\n' \"$(stat -c '%a %U %G' \"$k\")\"; echo keys; cat -- \"$k\" || exit 4; fi"
  end
  local r = h:raw(table.concat(lines, "\n"), { stdin = stdin })
  if r.code ~= 0 then fail("cannot read user " .. p.name .. ": " .. trim(r.stderr)) end
  if r.stdout:match("^absent") then return { exists = false } end
  local head, keys = r.stdout, nil
  local s, e = r.stdout:find("\nkeys\n", 1, true)
  if s then head, keys = r.stdout:sub(1, s), r.stdout:sub(e + 1) end
  local st = { exists = true, keys = keys }
  for l in head:gmatch("[^\n]+") do
    local tag, rest = l:match("^(%S+) ?(.*)$")
    if tag == "passwd" then
      local f = {}
      for x in (rest .. ":"):gmatch("([^:]*):") do f[#f + 1] = x end
      st.uid, st.gid, st.home, st.shell = tonumber(f[3]), tonumber(f[4]), f[6], f[7]
    elseif tag == "group" then st.group = rest
    elseif tag == "groups" then st.all_groups = words(rest)
    elseif tag == "password" then st.password_same = rest == "same"
    elseif tag == "sshdir" then st.sshdir = rest
    elseif tag == "keysfile" then st.keysfile = rest
    end
  end
  st.groups = {}
  for _, g in ipairs(st.all_groups or {}) do
    if g ~= st.group then st.groups[#st.groups + 1] = g end
  end
  table.sort(st.groups)
  return st
end

-- the authorized_keys content we want, given what is there
local function wanted_keys(p, current)
  local keys = key_list(p.authorized_keys)
  if p.authorized_keys_exclusive then
    return #keys == 0 and "" or table.concat(keys, "\n") .. "\n"
  end
  local have = {}
  for l in (current or ""):gmatch("[^\n]+") do
    local b = key_blob(l)
    if b then have[b] = true end
  end
  local out = current or ""
  for _, l in ipairs(keys) do
    local b = key_blob(l)
    if not have[b] then
      if out ~= "" and out:sub(-1) ~= "\n" then out = out .. "\n" end
      out = out .. l .. "\n"
      have[b] = true
    end
  end
  return out
end

local function diff_user(_, p, st)
  local fields, what = {}, {}
  if p.state == "absent" then
    if not st.exists then return nil end
    return { summary = "remove user" .. (p.remove and " and its home" or ""), fields = { state = { "present", "absent" } } }
  end
  local want_groups = group_list(p.groups)
  local keys_path = (p.home or st.home or ("/home/" .. p.name)) .. "/.ssh/authorized_keys"
  local r = { name = keys_path }
  if not st.exists then
    fields.state = { "absent", "present" }
    what[#what + 1] = "create user"
    if p.password ~= nil then fields.password = true end
    if want_groups then fields.groups = { added = want_groups, removed = {} } end
    if manages_keys(p) then
      local new = wanted_keys(p, nil)
      r.keys = new
      fields.authorized_keys = { added = #key_list(p.authorized_keys), removed = 0 }
      what[#what + 1] = "authorized_keys"
      r.before, r.after = "", new
    end
    r.summary, r.fields = table.concat(what, ", "), fields
    return r
  end
  if p.uid and p.uid ~= st.uid then
    fields.uid = { st.uid, p.uid }; what[#what + 1] = "uid " .. st.uid .. " → " .. p.uid
  end
  if p.group ~= nil then
    local same = is_int(p.group) and p.group == st.gid or p.group == st.group
    if not same then fields.group = { st.group, p.group }; what[#what + 1] = "group " .. st.group .. " → " .. p.group end
  end
  if want_groups then
    local have = set_of(st.groups)
    local want = set_of(want_groups)
    local added, removed = {}, {}
    for _, g in ipairs(want_groups) do if not have[g] then added[#added + 1] = g end end
    if p.append == false then
      for _, g in ipairs(st.groups) do if not want[g] then removed[#removed + 1] = g end end
    end
    if #added > 0 or #removed > 0 then
      fields.groups = { added = added, removed = removed }
      local parts = {}
      for _, g in ipairs(added) do parts[#parts + 1] = "+" .. g end
      for _, g in ipairs(removed) do parts[#parts + 1] = "-" .. g end
      what[#what + 1] = "groups " .. table.concat(parts, " ")
    end
  end
  if p.shell and p.shell ~= st.shell then
    fields.shell = { st.shell, p.shell }; what[#what + 1] = "shell " .. st.shell .. " → " .. p.shell
  end
  if p.home and p.home ~= st.home then
    fields.home = { st.home, p.home }; what[#what + 1] = "home " .. st.home .. " → " .. p.home
  end
  if p.password ~= nil and not st.password_same then fields.password = true; what[#what + 1] = "password" end
  if manages_keys(p) then
    local new = wanted_keys(p, st.keys)
    r.keys = new
    local owner_ok = function(stat, mode)
      return stat and stat == string.format("%s %s %s", mode, p.name, st.group)
    end
    if new ~= (st.keys or "") or st.keys == nil then
      fields.authorized_keys = true; what[#what + 1] = "authorized_keys"
      r.before, r.after = st.keys or "", new
    elseif not owner_ok(st.sshdir, "700") or not owner_ok(st.keysfile, "600") then
      fields.authorized_keys_mode = { (st.sshdir or "-") .. ", " .. (st.keysfile or "-"), "700, 600 " .. p.name }
      what[#what + 1] = "~/.ssh mode/owner"
    end
  end
  if #what == 0 then return nil end
  r.summary, r.fields = table.concat(what, ", "), fields
  return r
end

local function password_stdin(p) return p.name .. ":" .. p.password .. "\n" end

-- ~/.ssh (0700) and authorized_keys (0600), owned by the user; a missing
-- home is made for them (0700) rather than left to mkdir -p as root
local function write_keys(h, p, home, changes)
  local r = run(h, "user " .. p.name .. ": ~/.ssh", table.concat({
    "u=" .. quote(p.name) .. "; hd=" .. quote(home) .. "; d=\"$hd/.ssh\"",
    "g=$(id -gn -- \"$u\") || exit 1",
    "if [ ! -d \"$hd\" ]; then mkdir -p -- \"$hd\" && chown -- \"$u:$g\" \"$hd\" && chmod 0700 -- \"$hd\" || exit 1; fi",
    "if [ -L \"$d\" ]; then echo \"$d is a symlink\" >&2; exit 1; fi",
    "mkdir -p -- \"$d\" && chmod 0700 -- \"$d\" && chown -- \"$u:$g\" \"$d\" && printf '%s' \"$g\"",
  }, "\n"))
  h:write(home .. "/.ssh/authorized_keys", changes.keys, { mode = "0600", owner = p.name, group = r.stdout })
end

local function apply_user(h, p, st, changes)
  local name = quote(p.name)
  local f = changes.fields or {}
  if p.state == "absent" then
    run(h, "userdel " .. p.name, "userdel " .. (p.remove and "-r " or "") .. "-- " .. name)
    return
  end
  local home = p.home or st.home
  if not st.exists then
    local args = { "useradd" }
    if p.uid then args[#args + 1] = "-u " .. p.uid end
    if p.group then args[#args + 1] = "-g " .. quote(p.group) end
    local g = group_list(p.groups)
    if g and #g > 0 then args[#args + 1] = "-G " .. quote(table.concat(g, ",")) end
    if p.shell then args[#args + 1] = "-s " .. quote(p.shell) end
    if p.home then args[#args + 1] = "-d " .. quote(p.home) end
    args[#args + 1] = p.create_home == false and "-M" or "-m"
    if p.system then args[#args + 1] = "-r" end
    args[#args + 1] = "-- " .. name
    local cmd = table.concat(args, " ")
    local stdin
    if p.password ~= nil then
      cmd = cmd .. " && chpasswd -e"
      stdin = password_stdin(p)
    end
    cmd = cmd .. " && getent passwd " .. name .. " | cut -d: -f6"
    local r = run(h, "useradd " .. p.name, cmd, stdin)
    home = home or trim(r.stdout)
  else
    local args = {}
    if f.uid then args[#args + 1] = "-u " .. p.uid end
    if f.group then args[#args + 1] = "-g " .. quote(p.group) end
    if f.shell then args[#args + 1] = "-s " .. quote(p.shell) end
    if f.home then args[#args + 1] = "-d " .. quote(p.home) .. (p.create_home == false and "" or " -m") end
    if f.groups then
      if p.append == false then
        args[#args + 1] = "-G " .. quote(table.concat(group_list(p.groups), ","))
      else
        args[#args + 1] = "-a -G " .. quote(table.concat(f.groups.added, ","))
      end
    end
    if #args > 0 then run(h, "usermod " .. p.name, "usermod " .. table.concat(args, " ") .. " -- " .. name) end
    if f.password then run(h, "chpasswd " .. p.name, "chpasswd -e", password_stdin(p)) end
  end
  if f.authorized_keys or f.authorized_keys_mode then write_keys(h, p, home, changes) end
end

local user = recipe.resource {
  name = "user",
  description = "a local user account: ids, groups, shell, home, password hash, authorized_keys",
  defaults = { state = "present", append = true, create_home = true, system = false, remove = false,
    authorized_keys_exclusive = false },
  label = function(p) return p.name end,
  validate = validate_user,
  probe = probe_user,
  diff = diff_user,
  apply = apply_user,
}
-- `name` is the account's name here, not the step's
user.params_own = { name = true }

------------------------------------------------------------------------------
-- group

local group = recipe.resource {
  name = "group",
  description = "a local group",
  defaults = { state = "present", system = false },
  label = function(p) return p.name end,
  validate = function(p)
    if not valid_name(p.name) then return false, "name must be a group name, got '" .. tostring(p.name) .. "'" end
    if p.state ~= "present" and p.state ~= "absent" then
      return false, "state must be 'present' or 'absent', got '" .. tostring(p.state) .. "'"
    end
    if p.gid ~= nil and not is_int(p.gid) then return false, "gid must be a non-negative integer" end
    return true
  end,
  probe = function(h, p)
    local r = h:raw("getent group " .. quote(p.name) .. " || { echo absent; exit 0; }")
    if r.code ~= 0 then fail("cannot read group " .. p.name .. ": " .. trim(r.stderr)) end
    if r.stdout:match("^absent") then return { exists = false } end
    local gid, members = r.stdout:match("^[^:]*:[^:]*:(%d+):([^\n]*)")
    return { exists = true, gid = tonumber(gid), members = members }
  end,
  diff = function(_, p, st)
    if p.state == "absent" then
      if not st.exists then return nil end
      return { summary = "remove group", fields = { state = { "present", "absent" } } }
    end
    if not st.exists then return { summary = "create group", fields = { state = { "absent", "present" } } } end
    if p.gid and p.gid ~= st.gid then
      return { summary = "gid " .. st.gid .. " → " .. p.gid, fields = { gid = { st.gid, p.gid } } }
    end
    return nil
  end,
  apply = function(h, p, st)
    local name = quote(p.name)
    if p.state == "absent" then
      run(h, "groupdel " .. p.name, "groupdel -- " .. name)
    elseif not st.exists then
      run(h, "groupadd " .. p.name, "groupadd " .. (p.gid and ("-g " .. p.gid .. " ") or "") ..
        (p.system and "-r " or "") .. "-- " .. name)
    else
      run(h, "groupmod " .. p.name, "groupmod -g " .. p.gid .. " -- " .. name)
    end
  end,
}
group.params_own = { name = true }

return user
