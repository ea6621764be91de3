--- download: a file fetched from a URL on the target, verified by its SHA-256.
-- h:download{ url = "https://..." (string or secret), dest = "/usr/local/bin/tool", sha256 = "64 hex digits",
--             mode = "0755", owner = "root", group = "root", headers = { Authorization = secret }, force = false }
-- Nothing is fetched when dest's checksum already matches (without sha256: when dest exists, unless
-- force = true).  Otherwise curl on the target downloads into a temp file in dest's directory, the
-- checksum is verified, mode/owner applied, and the file renamed into place: dest is never half
-- written, and a wrong checksum fails and leaves the old file.  The URL and headers travel to curl on
-- stdin (a config file), so tokens in them never show on a command line.
local recipe = require "kengine.recipe"
local secret = require "kengine.secret"
local quote = require("kengine.host").quote

local function norm_mode(m)
  if m == nil then return nil end
  local n = tonumber(tostring(m), 8)
  return n and string.format("%o", n) or tostring(m)
end

local tail = require("kengine.host").tail

-- a curl config line: key = "value" with \ and " escaped
local function conf(key, value)
  return key .. " = \"" .. secret.reveal(value):gsub("[\\\"]", "\\%0"):gsub("\n", "\\n") .. "\"\n"
end

local function curl_config(p)
  local c = { conf("url", p.url) }
  local names = {}
  for k in pairs(p.headers or {}) do names[#names + 1] = k end
  table.sort(names)
  for _, k in ipairs(names) do
    c[#c + 1] = conf("header", k .. ": " .. secret.reveal(p.headers[k]))
  end
  return table.concat(c)
end

local function shown_url(p) return secret.is(p.url) and "***" or p.url end

return recipe.resource {
  name = "download",
  description = "a file downloaded from a URL and checked against its SHA-256",
  label = function(p) return p.dest end,
  validate = function(p)
    if type(p.url) ~= "string" and not secret.is(p.url) then return false, "url is required" end
    if not secret.reveal(p.url):match("^%a[%w+.%-]*://") then return false, "url must be a URL" end
    if type(p.dest) ~= "string" or p.dest:sub(1, 1) ~= "/" or p.dest:sub(-1) == "/" then
      return false, "dest must be an absolute file path"
    end
    if p.sha256 ~= nil then
      if type(p.sha256) ~= "string" then return false, "sha256 must be a string of 64 hex digits" end
      p.sha256 = p.sha256:lower():gsub("^sha256:", "")
      if not p.sha256:match("^" .. ("%x"):rep(64) .. "$") then
        return false, "sha256 must be 64 hex digits, got '" .. p.sha256 .. "'"
      end
    end
    if p.mode ~= nil and not tostring(p.mode):match("^0?[0-7]?[0-7][0-7][0-7]$") then
      return false, "mode must be octal like '0644', got '" .. tostring(p.mode) .. "'"
    end
    if p.headers ~= nil and type(p.headers) ~= "table" then return false, "headers must be a table" end
    return true
  end,

  -- one round trip: stat and checksum of dest
  probe = function(h, p)
    local d = quote(p.dest)
    local r = h:raw("if [ ! -e " .. d .. " ]; then echo none; exit 0; fi; stat -c '%F|%a|%U|%G' -- " .. d ..
      " && if [ -f " .. d .. " ]; then sha256sum < " .. d .. "; fi")
    if r.code ~= 0 then error("cannot read " .. p.dest .. ": " .. tail(r.stderr, 3), 0) end
    if r.stdout:match("^none") then return { exists = false } end
    local kind, mode, owner, group = r.stdout:match("^([^|]+)|(%d+)|([^|]+)|([^\n]+)\n")
    return { exists = true, kind = kind, mode = mode, owner = owner, group = group,
      sha256 = r.stdout:match("\n(%x+)") }
  end,

  diff = function(_, p, st)
    if st.exists and not st.kind:match("regular") then
      error(p.dest .. " exists and is a " .. st.kind .. ", not a file", 0)
    end
    local what, fields = {}, {}
    local fetch = not st.exists or p.force or (p.sha256 and st.sha256 ~= p.sha256)
    if fetch then
      what[#what + 1] = (st.exists and "replace from " or "download ") .. shown_url(p)
      fields.download = true
      if st.exists and p.sha256 then fields.sha256 = { st.sha256, p.sha256 } end
    else
      if p.mode and norm_mode(p.mode) ~= st.mode then
        what[#what + 1] = "mode " .. st.mode .. " → " .. norm_mode(p.mode)
        fields.mode = { st.mode, norm_mode(p.mode) }
      end
      if p.owner and p.owner ~= st.owner then
        what[#what + 1] = "owner " .. st.owner .. " → " .. p.owner
        fields.owner = { st.owner, p.owner }
      end
      if p.group and p.group ~= st.group then
        what[#what + 1] = "group " .. st.group .. " → " .. p.group
        fields.group = { st.group, p.group }
      end
    end
    if #what == 0 then return nil end
    return { summary = table.concat(what, ", "), fields = fields }
  end,

  apply = function(h, p, _, changes)
    local d = quote(p.dest)
    local f = changes.fields
    local owner = (p.owner or p.group) and quote((p.owner or "") .. (p.group and (":" .. p.group) or ""))
    if not f.download then
      local cmds = {}
      if f.mode then cmds[#cmds + 1] = "chmod " .. norm_mode(p.mode) .. " -- " .. d end
      if f.owner or f.group then cmds[#cmds + 1] = "chown " .. owner .. " -- " .. d end
      local r = h:raw(table.concat(cmds, " && "))
      if r.code ~= 0 then error("cannot change " .. p.dest .. ": " .. tail(r.stderr, 3), 0) end
      return
    end
    local mode = p.mode and norm_mode(p.mode)
    local script = {
      "command -v curl >/dev/null 2>&1 || { echo 'curl is not installed on the target' >&2; exit 20; }",
      "p=" .. d .. "; t=$(mktemp \"$(dirname -- \"$p\")/.kengine-dl-XXXXXX\") || exit 21",
      "trap 'rm -f -- \"$t\"' EXIT",
      -- a stalled transfer (under 1 byte/s for a minute) is abandoned
      "curl -fsSL --retry 2 --connect-timeout 30 -y 60 -Y 1 -K - -o \"$t\" || exit $((100 + $?))",
      "got=$(sha256sum < \"$t\" | cut -d' ' -f1)",
    }
    if p.sha256 then
      script[#script + 1] = "if [ \"$got\" != " .. p.sha256 .. " ]; then echo \"$got\"; exit 23; fi"
    end
    if mode then
      script[#script + 1] = "chmod " .. mode .. " \"$t\" || exit 24"
    else
      script[#script + 1] = "if [ -e \"$p\" ]; then chmod --reference=\"$p\" \"$t\"; else chmod 644 \"$t\"; fi || exit 24"
    end
    if owner then
      script[#script + 1] = "chown " .. owner .. " \"$t\" || exit 24"
    else
      script[#script + 1] = "if [ -e \"$p\" ]; then chown --reference=\"$p\" \"$t\" 2>/dev/null; fi; true"
    end
    script[#script + 1] = "mv -f -- \"$t\" \"$p\" || exit 24"
    script[#script + 1] = "trap - EXIT; echo \"$got\""
    local r = h:raw(table.concat(script, "\n"), { stdin = curl_config(p) })
    local url = shown_url(p)
    if r.code == 23 then
      error(string.format("checksum mismatch for %s: expected sha256 %s, got %s (%s left unchanged)", url,
        p.sha256, r.stdout:match("%x+") or "?", p.dest), 0)
    elseif r.code > 100 then
      error(string.format("cannot download %s (curl exit %d): %s", url, r.code - 100, tail(r.stderr, 3)), 0)
    elseif r.code ~= 0 then
      error(string.format("cannot download %s to %s: %s", url, p.dest, tail(r.stderr, 3)), 0)
    end
    return { sha256 = r.stdout:match("%x+") }
  end,
}
