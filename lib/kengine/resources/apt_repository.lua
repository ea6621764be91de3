--- apt_repository: an apt source with its own signing key (signed-by), the way Docker's and Kubernetes'
-- repositories are added on Debian and Ubuntu.
-- h:apt_repository{ name = "docker" (file names), uri = "https://download.docker.com/linux/debian",
--                   suite = "bookworm" (or "./" style paths for flat repositories), components = { "stable" },
--                   key = "-----BEGIN PGP PUBLIC KEY BLOCK-----..." (armored or binary) or key_url = "https://...",
--                   keyring = "/etc/apt/keyrings/NAME.asc" (or .gpg: binary, dearmored here),
--                   arch = "amd64" or { ... }, types = { "deb" }, format = "deb822"|"list", state = "present"|"absent" }
-- Writes the keyring and /etc/apt/sources.list.d/NAME.sources (deb822; format = "list" writes a one-line
-- NAME.list instead) with Signed-By.  Converting between armored and binary keys happens on the controller,
-- so the target needs no gpg.  key_url is fetched on the target with curl (file:// works too) in every run and
-- compared with the keyring.  When it changes anything, the apt lists are stale: it leaves a marker that makes
-- the next `package` step update the cache (with or without update_cache).
local recipe = require "kengine.recipe"
local quote = require("kengine.host").quote

-- shared with package.lua: the lists must be updated whatever their age
local NEEDED = "/var/lib/kengine/apt-update-needed"

local base64 = require "kengine.base64"
local b64decode, b64encode = base64.decode, base64.encode

-- OpenPGP ASCII armor checksum (RFC 4880, 6.1)
local function crc24(s)
  local crc = 0xB704CE
  for i = 1, #s do
    crc = crc ~ (s:byte(i) << 16)
    for _ = 1, 8 do
      crc = crc << 1
      if crc & 0x1000000 ~= 0 then crc = crc ~ 0x1864CFB end
    end
  end
  return crc & 0xFFFFFF
end

local function is_armored(s) return s:find("-----BEGIN PGP PUBLIC KEY BLOCK-----", 1, true) ~= nil end

--- The binary packets of an armored key.  @return bytes or nil, msg
local function dearmor(text)
  local body = text:match("%-%-%-%-%-BEGIN PGP PUBLIC KEY BLOCK%-%-%-%-%-\r?\n(.-)%-%-%-%-%-END PGP PUBLIC KEY BLOCK")
  if not body then return nil, "not an ASCII-armored public key block" end
  -- armor headers (Version: ...) end at the first empty line
  local data = body:match("^.-\r?\n\r?\n(.*)$")
  if not body:match("^[%w%-]+: ") then data = body end
  data = data or body
  local lines = {}
  for l in data:gmatch("[^\r\n]+") do
    if l:sub(1, 1) == "=" and #l == 5 then break end -- the checksum line
    lines[#lines + 1] = l
  end
  local bytes = b64decode(table.concat(lines))
  if #bytes == 0 then return nil, "empty key block" end
  return bytes
end

local function armor(bytes)
  local b64 = b64encode(bytes)
  local lines = { "-----BEGIN PGP PUBLIC KEY BLOCK-----", "" }
  for i = 1, #b64, 64 do lines[#lines + 1] = b64:sub(i, i + 63) end
  local crc = crc24(bytes)
  lines[#lines + 1] = "=" .. b64encode(string.char((crc >> 16) & 0xff, (crc >> 8) & 0xff, crc & 0xff))
  lines[#lines + 1] = "-----END PGP PUBLIC KEY BLOCK-----"
  return table.concat(lines, "\n") .. "\n"
end

-- the keyring's content for a key given as armored text or binary packets
local function keyring_content(key, keyring, where)
  if keyring:match("%.asc$") then
    if is_armored(key) then return key end
    return armor(key)
  end
  if is_armored(key) then
    local bytes, err = dearmor(key)
    if not bytes then error("apt_repository: " .. where .. ": " .. err, 0) end
    return bytes
  end
  if key:match("^[%g%s]*$") then
    error("apt_repository: " .. where .. " is neither an armored nor a binary OpenPGP key", 0)
  end
  return key
end

local function list(v)
  if v == nil then return {} end
  if type(v) == "table" then return v end
  return { v }
end

local function paths(p)
  local base = "/etc/apt/sources.list.d/" .. p.name
  return base .. ".sources", base .. ".list"
end

-- the keyring: given, or /etc/apt/keyrings/NAME.asc when there is a key (and when removing)
local function keyring_of(p)
  if p.keyring then return p.keyring end
  if p.key or p.key_url or p.state == "absent" then return "/etc/apt/keyrings/" .. p.name .. ".asc" end
  return nil
end

local function source_text(p, keyring)
  local types, arch, comps = list(p.types), list(p.arch), list(p.components)
  if #types == 0 then types = { "deb" } end
  if p.format == "list" then
    local opts = {}
    if #arch > 0 then opts[#opts + 1] = "arch=" .. table.concat(arch, ",") end
    if keyring then opts[#opts + 1] = "signed-by=" .. keyring end
    local o = #opts > 0 and ("[" .. table.concat(opts, " ") .. "] ") or ""
    local lines = { "# managed by kengine (apt_repository " .. p.name .. ")" }
    for _, t in ipairs(types) do
      local l = t .. " " .. o .. p.uri .. " " .. p.suite
      if #comps > 0 then l = l .. " " .. table.concat(comps, " ") end
      lines[#lines + 1] = l
    end
    return table.concat(lines, "\n") .. "\n"
  end
  local lines = {
    "# managed by kengine (apt_repository " .. p.name .. ")",
    "Types: " .. table.concat(types, " "),
    "URIs: " .. p.uri,
    "Suites: " .. p.suite,
  }
  if #comps > 0 then lines[#lines + 1] = "Components: " .. table.concat(comps, " ") end
  if #arch > 0 then lines[#lines + 1] = "Architectures: " .. table.concat(arch, " ") end
  if keyring then lines[#lines + 1] = "Signed-By: " .. keyring end
  return table.concat(lines, "\n") .. "\n"
end

local function curl_config(url)
  return "url = \"" .. url:gsub("[\\\"]", "\\%0") .. "\"\n"
end

local function basename(path) return path:match("([^/]+)$") end

local res = recipe.resource {
  name = "apt_repository",
  description = "an apt repository with its signing key in a signed-by keyring",
  defaults = { state = "present", format = "deb822", components = { "main" } },
  label = function(p) return p.name end,
  validate = function(p)
    if type(p.name) ~= "string" or not p.name:match("^[%w][%w._%-]*$") then
      return false, "name must be a file name like 'docker' (letters, digits, . _ -)"
    end
    if p.state ~= "present" and p.state ~= "absent" then return false, "state must be 'present' or 'absent'" end
    if p.format ~= "deb822" and p.format ~= "list" then return false, "format must be 'deb822' or 'list'" end
    if p.key ~= nil and p.key_url ~= nil then return false, "give key or key_url, not both" end
    if p.key ~= nil and (type(p.key) ~= "string" or p.key == "") then return false, "key must be the key's text" end
    if p.key_url ~= nil and (type(p.key_url) ~= "string" or not p.key_url:match("^%a[%w+.%-]*://")) then
      return false, "key_url must be a URL"
    end
    if p.keyring ~= nil and (type(p.keyring) ~= "string" or not p.keyring:match("^/.*[^/]%.asc$")
      and not p.keyring:match("^/.*[^/]%.gpg$")) then
      return false, "keyring must be an absolute path ending in .asc or .gpg"
    end
    if p.state == "present" then
      for _, f in ipairs({ "uri", "suite" }) do
        if type(p[f]) ~= "string" or p[f] == "" or p[f]:find("%s") then
          return false, f .. " is required (a string without spaces)"
        end
      end
      if p.suite:sub(-1) == "/" then
        -- a flat repository: no components (the default { "main" } is dropped)
        local c = list(p.components)
        if #c > 1 or (#c == 1 and c[1] ~= "main") then
          return false, "a flat repository (suite ending in '/') has no components"
        end
        p.components = {}
      end
      for _, f in ipairs({ "components", "arch", "types" }) do
        for _, v in ipairs(list(p[f])) do
          if type(v) ~= "string" or not v:match("^[%w._%-]+$") then
            return false, f .. ": invalid value '" .. tostring(v) .. "'"
          end
        end
      end
    end
    return true
  end,

  -- one round trip: both source files, the keyring (base64, it may be binary) and the key_url's content
  probe = function(h, p)
    local sources, listfile = paths(p)
    local keyring = keyring_of(p)
    local files = { sources, listfile, keyring }
    local script = {}
    for _, f in ipairs(files) do
      local q = quote(f)
      script[#script + 1] = "if [ -f " .. q .. " ]; then echo @@file; base64 -w0 < " .. q ..
        " || exit 3; echo; else echo @@none; echo; fi"
    end
    local stdin
    if p.key_url and p.state == "present" then
      stdin = curl_config(p.key_url)
      script[#script + 1] = "t=$(mktemp) || exit 3; if curl -fsSL --max-time 120 -K - -o \"$t\" 2>\"$t.err\"; then " ..
        "echo @@key; base64 -w0 < \"$t\"; echo; rm -f \"$t\" \"$t.err\"; else rc=$?; cat \"$t.err\" >&2; " ..
        "rm -f \"$t\" \"$t.err\"; exit $((rc + 10)); fi"
    end
    local r = h:raw(table.concat(script, "\n"), { stdin = stdin })
    if r.code >= 10 then
      error("apt_repository " .. p.name .. ": cannot fetch " .. p.key_url .. ": " ..
        (r.stderr:gsub("%s+$", "")) .. " (curl exit " .. (r.code - 10) .. ")", 0)
    elseif r.code ~= 0 then
      error("apt_repository " .. p.name .. ": cannot read its files: " .. r.stderr, 0)
    end
    local st, i = { files = {} }, 0
    for tag, data in r.stdout:gmatch("@@(%a+)\n([^\n]*)\n") do
      if tag == "key" then
        st.fetched = b64decode(data)
      else
        i = i + 1
        st.files[files[i]] = tag == "file" and b64decode(data) or nil
      end
    end
    st.sources, st.list, st.keyring = st.files[sources], st.files[listfile], keyring and st.files[keyring]
    return st
  end,

  diff = function(h, p, st)
    local sources, listfile = paths(p)
    local keyring = keyring_of(p)
    local want_file, other = sources, listfile
    if p.format == "list" then want_file, other = listfile, sources end
    local have = st.files[want_file]
    local what, fields = {}, {}
    local ch = { remove = {} }
    if p.state == "absent" then
      for _, f in ipairs({ sources, listfile, keyring }) do
        if f and st.files[f] then ch.remove[#ch.remove + 1] = f; what[#what + 1] = "remove " .. f end
      end
      if #what == 0 then return nil end
      h.apt_sources_changed = true
      ch.summary, ch.before, ch.after, ch.name = table.concat(what, ", "), have or "", "", want_file
      ch.fields = { remove = ch.remove }
      return ch
    end
    local text = source_text(p, keyring)
    if have ~= text then
      ch.source = text
      fields.source = want_file
      what[#what + 1] = (have and "update " or "create ") .. basename(want_file)
    end
    if st.files[other] then
      ch.remove[#ch.remove + 1] = other
      what[#what + 1] = "remove " .. basename(other)
    end
    local key = p.key or st.fetched
    if key then
      local content = keyring_content(key, keyring, p.key and "key" or p.key_url)
      if content ~= st.keyring then
        ch.keyring = content
        fields.keyring = keyring
        what[#what + 1] = (st.keyring and "replace key " or "write key ") .. keyring
      end
    end
    if #what == 0 then return nil end
    h.apt_sources_changed = true
    ch.summary, ch.fields, ch.name = table.concat(what, ", "), fields, want_file
    ch.before, ch.after = have or "", text
    return ch
  end,

  apply = function(h, p, _, ch)
    if ch.keyring then
      local dir = p.keyring and p.keyring:match("^(.*)/[^/]*$") or "/etc/apt/keyrings"
      local r = h:raw("mkdir -p -m 0755 -- " .. quote(dir))
      if r.code ~= 0 then error("cannot create " .. dir .. ": " .. r.stderr, 0) end
      h:write(keyring_of(p), ch.keyring, { mode = "0644", owner = "root", group = "root" })
    end
    if ch.source then
      h:write(p.format == "list" and select(2, paths(p)) or paths(p), ch.source,
        { mode = "0644", owner = "root", group = "root" })
    end
    local cmds = {}
    for _, f in ipairs(ch.remove) do cmds[#cmds + 1] = "rm -f -- " .. quote(f) end
    cmds[#cmds + 1] = "mkdir -p /var/lib/kengine && touch " .. NEEDED
    local r = h:raw(table.concat(cmds, " && "))
    if r.code ~= 0 then error("apt_repository " .. p.name .. ": " .. r.stderr, 0) end
  end,
}
-- `name` names the repository's files here, not the step
res.params_own = { name = true }

-- for tests and other resources
res.dearmor, res.armor = dearmor, armor

return res
