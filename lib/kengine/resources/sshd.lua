--- sshd: an OpenSSH server hardening drop-in, validated and safe to apply.
-- h:sshd{ settings = { PasswordAuthentication = "no", PermitRootLogin = "prohibit-password",
--                      Ciphers = "chacha20-poly1305@openssh.com,aes256-gcm@openssh.com", ... },
--         path = "/etc/ssh/sshd_config.d/50-kengine.conf", state = "present"|"absent",
--         main_config = "/etc/ssh/sshd_config", reload = true }
-- The drop-in holds one `Keyword value` line per setting (sorted; true/false become yes/no; a list becomes
-- one comma-separated value for algorithm keywords, else one line per item).  Applying it:
--   1. the main config must Include the path (Debian 12's includes sshd_config.d/*.conf);
--   2. the candidate is written (atomically) and `sshd -t` must accept the whole config;
--   3. `sshd -T -C user=U,host=,addr=,laddr=,lport=` (the connection kengine uses, from $SSH_CONNECTION)
--      must not lock U out: PermitRootLogin, Allow/DenyUsers, Allow/DenyGroups, PubkeyAuthentication,
--      PasswordAuthentication, AuthenticationMethods, AuthorizedKeysFile, ForceCommand, MaxSessions, Port;
--      and every setting must take effect (an earlier file or line would win over it);
--   4. sshd is reloaded (systemctl reload, else SIGHUP to the pid file's sshd, else `service ssh reload`);
--   5. a NEW SSH connection with the run's settings must log in and run a command.
-- Any failure restores the previous file (or removes the new one), reloads again if it had reloaded,
-- and fails the step: a broken or locking-out config is never left in place.
local recipe = require "kengine.recipe"
local secret = require "kengine.secret"
local ssh = require "kengine.ssh"
local core = require "kengine.core"
local quote = require("kengine.host").quote

local DEFAULT_PATH = "/etc/ssh/sshd_config.d/50-kengine.conf"
local HEADER = "# Managed by kengine (h:sshd): local changes are overwritten.\n"

-- keywords whose value is one comma-separated list
local COMMA = {}
for _, key in ipairs({ "ciphers", "macs", "kexalgorithms", "hostkeyalgorithms", "pubkeyacceptedalgorithms",
  "pubkeyacceptedkeytypes", "hostbasedacceptedalgorithms", "hostbasedacceptedkeytypes",
  "casignaturealgorithms", "gssapikexalgorithms" }) do
  COMMA[key] = true
end

local function fail(msg) error("sshd: " .. msg, 0) end
local function trim(s) return (s or ""):gsub("^%s+", ""):gsub("%s+$", "") end

local function value_text(v)
  if v == true then return "yes" elseif v == false then return "no" end
  return tostring(v)
end

-- the drop-in's text: sorted keywords, one line each (lists: see above)
local function render(settings)
  local keys = {}
  for key in pairs(settings) do keys[#keys + 1] = key end
  table.sort(keys, function(a, b) return a:lower() < b:lower() end)
  local out = { HEADER }
  for _, key in ipairs(keys) do
    local v = settings[key]
    if type(v) == "table" then
      if COMMA[key:lower()] then
        local parts = {}
        for i, x in ipairs(v) do parts[i] = value_text(x) end
        out[#out + 1] = key .. " " .. table.concat(parts, ",") .. "\n"
      else
        for _, x in ipairs(v) do out[#out + 1] = key .. " " .. value_text(x) .. "\n" end
      end
    else
      out[#out + 1] = key .. " " .. value_text(v) .. "\n"
    end
  end
  return table.concat(out)
end

-- keyword (lower case) -> value text from a config file's lines, and the
-- keywords as spelled there (for the summary)
local function parse(text, names)
  local t = {}
  for l in (text or ""):gmatch("[^\n]+") do
    local key, v = l:match("^%s*([%a%d]+)%s+(.-)%s*$")
    if key then
      local k = key:lower()
      t[k] = t[k] and (t[k] .. "\n" .. v) or v
      names[k] = names[k] or key
    end
  end
  return t
end

local function validate(p)
  if p.state ~= "present" and p.state ~= "absent" then
    return false, "state must be 'present' or 'absent', got '" .. tostring(p.state) .. "'"
  end
  if type(p.path) ~= "string" or p.path:sub(1, 1) ~= "/" then return false, "path must be an absolute path" end
  if type(p.main_config) ~= "string" then return false, "main_config must be a path" end
  if p.state == "absent" then return true end
  if type(p.settings) ~= "table" or next(p.settings) == nil then
    return false, "settings must be a table of sshd_config keywords and values"
  end
  for key, v in pairs(p.settings) do
    if type(key) ~= "string" or not key:match("^%a%w*$") then
      return false, "settings: '" .. tostring(key) .. "' is not an sshd_config keyword"
    end
    local low = key:lower()
    if low == "match" or low == "include" then
      return false, "settings: " .. key .. " is not supported in a kengine drop-in"
    end
    local vals = type(v) == "table" and v or { v }
    if type(v) == "table" and #v == 0 then return false, "settings." .. key .. " is an empty list" end
    for _, x in ipairs(vals) do
      local tx = type(x)
      if tx ~= "string" and tx ~= "number" and tx ~= "boolean" then
        return false, "settings." .. key .. " must be a string, number, boolean or a list of them"
      end
      if tx == "string" and (x == "" or x:find("[\r\n]")) then
        return false, "settings." .. key .. " must be a non-empty single line"
      end
    end
  end
  return true
end

-- One round trip: sshd's path, the main config's Include lines, the drop-in.
local function probe(h, p)
  local r = h:raw(table.concat({
    "m=" .. quote(p.main_config) .. "; p=" .. quote(p.path),
    "s=$(command -v sshd || { [ -x /usr/sbin/sshd ] && echo /usr/sbin/sshd; })",
    "printf 'sshd %s\\n' \"${s:-none}\"",
    "if [ -d \"$(dirname -- \"$p\")\" ]; then echo dir; else echo nodir; fi",
    "grep -i '^[[:space:]]*include[[:space:]]' \"$m\" 2>/dev/null | sed 's/^[[:space:]]*[^[:space:]]*/include/'",
    "if [ -f \"$p\" ]; then printf 'file %s\\n' \"$(stat -c %a -- \"$p\")\"; echo content; cat -- \"$p\" || exit 4; fi",
  }, "\n"))
  if r.code ~= 0 then fail("cannot read " .. p.path .. ": " .. trim(r.stderr)) end
  local head, content = r.stdout, nil
  local s, e = r.stdout:find("\ncontent\n", 1, true)
  if s then head, content = r.stdout:sub(1, s), r.stdout:sub(e + 1) end
  local st = { includes = {}, content = content, exists = content ~= nil }
  for l in head:gmatch("[^\n]+") do
    local tag, rest = l:match("^(%S+) ?(.*)$")
    if tag == "sshd" then st.sshd = rest ~= "none" and rest or nil
    elseif tag == "dir" then st.dir = true
    elseif tag == "include" then
      for w in rest:gmatch("%S+") do st.includes[#st.includes + 1] = w end
    elseif tag == "file" then st.mode = rest
    end
  end
  return st
end

local function glob_to_pattern(g)
  return "^" .. g:gsub("[%^%$%(%)%%%.%[%]%+%-]", "%%%0"):gsub("%*", "[^/]*"):gsub("%?", "[^/]") .. "$"
end

-- does the main config Include the drop-in's path? (relative Includes are under /etc/ssh)
local function included(p, st)
  if p.path == p.main_config then return true end
  local base = p.main_config:match("^(.*)/[^/]*$") or "/etc/ssh"
  for _, g in ipairs(st.includes) do
    if g:sub(1, 1) ~= "/" then g = base .. "/" .. g end
    if p.path:match(glob_to_pattern(g)) then return true end
  end
  return false
end

local function diff(_, p, st)
  if not st.sshd then fail("the OpenSSH server is not installed (no sshd on the host)") end
  if p.state == "absent" then
    if not st.exists then return nil end
    return { summary = "remove " .. p.path, before = st.content, after = "", name = p.path,
      fields = { state = { "present", "absent" } } }
  end
  if not included(p, st) then
    fail(p.main_config .. " has no Include matching " .. p.path .. ", so the drop-in would have no effect " ..
      "(add `Include /etc/ssh/sshd_config.d/*.conf` at its top, as Debian 12 does)")
  end
  local want = render(p.settings)
  if st.content == want then return nil end
  local spelled = {}
  local new, old = parse(want, spelled), parse(st.content, spelled)
  local fields, names = {}, {}
  for key, name in pairs(spelled) do
    if old[key] ~= new[key] then fields[name] = { old[key] or "", new[key] or "" }; names[#names + 1] = name end
  end
  table.sort(names)
  local summary = st.exists and ("settings: " .. (#names > 0 and table.concat(names, ", ") or "comments"))
    or ("create " .. p.path)
  return { summary = summary, before = st.content or "", after = want, name = p.path, fields = fields, want = want }
end

------------------------------------------------------------------------------
-- lockout checks on `sshd -T -C ...` output

local function glob_match(pat, s)
  local lp = "^" .. pat:gsub("[%^%$%(%)%%%.%[%]%+%-]", "%%%0"):gsub("%*", ".*"):gsub("%?", ".") .. "$"
  return s:match(lp) ~= nil
end

local function ipv4(a)
  local o = { a:match("^(%d+)%.(%d+)%.(%d+)%.(%d+)$") }
  if #o ~= 4 then return nil end
  local n = 0
  for _, x in ipairs(o) do n = n * 256 + tonumber(x) end
  return n
end

-- a host part of USER@HOST: a glob on name and address, or an IPv4 CIDR
-- (anything we cannot judge counts as not matching, which refuses Allow*)
local function host_match(pat, conn)
  local net, bits = pat:match("^([%d%.]+)/(%d+)$")
  if net then
    local a, n = ipv4(conn.addr), ipv4(net)
    if not a or not n then return false end
    local shift = 32 - tonumber(bits)
    return a >> shift == n >> shift
  end
  return glob_match(pat, conn.addr) or glob_match(pat, conn.host)
end

local function user_match(entry, user, conn)
  local u, host = entry:match("^([^@]*)@(.+)$")
  if not u then return glob_match(entry, user) end
  return glob_match(u, user) and host_match(host, conn)
end

local function list_of(eff, key)
  local t = {}
  for _, line in ipairs(eff[key] or {}) do
    if line ~= "none" then for w in line:gmatch("%S+") do t[#t + 1] = w end end
  end
  return t
end

-- why the effective config would lock `user` out, or nil
local function lockout(eff, user, groups, method, conn)
  local function one(key) return eff[key] and eff[key][1] end
  local problems = {}
  local function add(msg) problems[#problems + 1] = msg end
  local prl = one("permitrootlogin")
  if user == "root" and prl then
    if prl == "no" then add("PermitRootLogin no would refuse root, the user kengine is connected as")
    elseif prl == "forced-commands-only" then add("PermitRootLogin forced-commands-only would stop kengine's commands as root")
    elseif method == "password" and (prl == "without-password" or prl == "prohibit-password") then
      add("PermitRootLogin prohibit-password would refuse root's password login, which kengine uses")
    end
  end
  local allow = list_of(eff, "allowusers")
  if #allow > 0 then
    local ok = false
    for _, e in ipairs(allow) do if user_match(e, user, conn) then ok = true end end
    if not ok then add("AllowUsers does not include " .. user .. ", the user kengine is connected as") end
  end
  for _, e in ipairs(list_of(eff, "denyusers")) do
    if user_match(e, user, conn) then
      add("DenyUsers " .. e .. " would refuse " .. user .. ", the user kengine is connected as")
    end
  end
  local allowg = list_of(eff, "allowgroups")
  if #allowg > 0 then
    local ok = false
    for _, g in ipairs(allowg) do for _, ug in ipairs(groups) do if glob_match(g, ug) then ok = true end end end
    if not ok then add("AllowGroups has none of " .. user .. "'s groups (" .. table.concat(groups, " ") .. ")") end
  end
  for _, g in ipairs(list_of(eff, "denygroups")) do
    for _, ug in ipairs(groups) do
      if glob_match(g, ug) then add("DenyGroups " .. g .. " would refuse " .. user .. " (group " .. ug .. ")") end
    end
  end
  if method == "publickey" then
    if one("pubkeyauthentication") == "no" then
      add("PubkeyAuthentication no would refuse the key kengine is connected with")
    end
    if one("authorizedkeysfile") == "none" and (one("authorizedkeyscommand") or "none") == "none" then
      add("AuthorizedKeysFile none (and no AuthorizedKeysCommand) leaves no authorized keys")
    end
  elseif method == "password" and one("passwordauthentication") == "no" then
    add("PasswordAuthentication no would refuse the password kengine is connected with")
  end
  local am = one("authenticationmethods")
  if am and am ~= "any" then
    local ok = false
    for alt in am:gmatch("%S+") do
      local all = true
      for m in alt:gmatch("[^,]+") do if m:match("^[^:]+") ~= method then all = false end end
      if all then ok = true end
    end
    if not ok then add("AuthenticationMethods " .. am .. " needs more than " .. method .. ", which kengine uses") end
  end
  local fc = one("forcecommand")
  if fc and fc ~= "none" then add("ForceCommand would replace every command kengine runs") end
  if one("maxsessions") == "0" then add("MaxSessions 0 would refuse kengine's sessions") end
  if conn.lport and eff.port then
    local ok = false
    for _, port in ipairs(eff.port) do if port == conn.lport then ok = true end end
    if not ok then add("Port " .. table.concat(eff.port, " ") .. " no longer includes " .. conn.lport ..
      ", the port kengine is connected to") end
  end
  if #problems == 0 then return nil end
  return table.concat(problems, "; ")
end

local DURATION = "^%d+[smhdwSMHDW]"
local ALIAS = { ["prohibit-password"] = "without-password" }

-- settings an earlier file or line overrides (sshd keeps the first value it reads)
local function overridden(eff, settings)
  local out = {}
  for key, v in pairs(settings) do
    local low = key:lower()
    local mine
    if type(v) ~= "table" then
      mine = value_text(v)
    elseif COMMA[low] then
      local parts = {}
      for i, x in ipairs(v) do parts[i] = value_text(x) end
      mine = table.concat(parts, ",")
    end
    local got = eff[low]
    if mine and got and #got == 1 and not mine:find("%s") and not mine:match(DURATION) and
      not mine:match("^[%+%-%^]") then
      local a, b = mine:lower(), got[1]:lower()
      if (ALIAS[a] or a) ~= (ALIAS[b] or b) then out[#out + 1] = key .. " (effective: " .. got[1] .. ")" end
    end
  end
  table.sort(out)
  return out
end

------------------------------------------------------------------------------
-- apply

-- who kengine is logged in as, and from/to where (without sudo: sudo would
-- reset $SSH_CONNECTION)
local function connection(h)
  local r = h:raw("printf '%s\\n' \"$SSH_CONNECTION\"; id -un", { sudo = false })
  local line, user = r.stdout:match("^([^\n]*)\n([^\n]*)")
  local c = { addr = "127.0.0.1", host = "localhost", user = user ~= "" and user or h:login_user() }
  local caddr, _, laddr, lport = (line or ""):match("^(%S+) (%S+) (%S+) (%S+)")
  if caddr then c.addr, c.host, c.laddr, c.lport = caddr, caddr, laddr, lport end
  return c
end

local function put_back(h, p, st)
  if st.exists then
    h:write(p.path, st.content, { mode = st.mode })
  else
    h:raw("rm -f -- " .. quote(p.path))
  end
end

local function reload(h, pidfile)
  local r = h:raw(table.concat({
    "if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then",
    "  if systemctl reload ssh.service 2>/dev/null || systemctl reload sshd.service; then echo 'systemctl reload'; exit 0; fi",
    "  exit 1",
    "fi",
    "pf=" .. quote(pidfile or "/run/sshd.pid"),
    "pid=$(cat -- \"$pf\" 2>/dev/null)",
    "case \"$pid\" in ''|*[!0-9]*) pid= ;; esac",
    "if [ -n \"$pid\" ] && [ \"$(cat /proc/$pid/comm 2>/dev/null)\" = sshd ]; then :; else pid=$(pgrep -o -x sshd); fi",
    "if [ -n \"$pid\" ] && kill -HUP \"$pid\"; then echo \"kill -HUP $pid\"; exit 0; fi",
    "if command -v service >/dev/null 2>&1 && [ -x /etc/init.d/ssh ]; then",
    "  service ssh reload && echo 'service ssh reload' && exit 0",
    "fi",
    "echo 'no running sshd found to reload' >&2; exit 1",
  }, "\n"))
  if r.code ~= 0 then return nil, trim(r.stderr) end
  return trim(r.stdout)
end

-- while sshd re-executes itself, a connection may be refused or cut: retry
-- those for a while; a protocol error (e.g. no common algorithm) a few times;
-- anything else (an authentication failure) is final
local RETRY = { ECONNREFUSED = true, ECLOSED = true, ETIMEDOUT = true }

-- a new connection with the run's settings (what the runner uses)
local function new_connection(h)
  local c = h.conn
  local deadline = core.now() + 15
  local last
  local protocol_errors = 0
  repeat
    local s, err, code = ssh.connect {
      host = c.host or h.name, port = c.port, user = c.user,
      identity = c.identity, known_hosts = c.known_hosts or os.getenv("KENGINE_KNOWN_HOSTS"),
      host_key = c.host_key, password = c.password and secret.reveal(c.password) or nil,
      agent = c.agent, timeout = 10, config = c.config,
    }
    if s then
      local r, xerr, xcode = s:exec("true")
      s:close()
      if r and r.code == 0 then return true end
      last, code = xerr or ("`true` exited " .. tostring(r and r.code)), xcode
    else
      last = err
    end
    -- "Socket error: Connection reset by peer" while the listener re-executes
    local transient = RETRY[code] or code == "EPROTO" and tostring(last):find("Socket error", 1, true)
    if code == "EPROTO" and not transient then protocol_errors = protocol_errors + 1 end
    if not (transient or code == "EPROTO" and protocol_errors < 3) then break end
    core.sleep(0.25)
  until core.now() > deadline
  return nil, last
end

local function apply(h, p, st, changes)
  local conn = connection(h)
  local user = conn.user
  if p.state == "present" and not st.dir then
    local r = h:raw("mkdir -p -- " .. quote(p.path:match("^(.*)/[^/]*$")))
    if r.code ~= 0 then fail("cannot create the directory of " .. p.path .. ": " .. trim(r.stderr)) end
  end
  if p.state == "absent" then
    local r = h:raw("rm -f -- " .. quote(p.path))
    if r.code ~= 0 then fail("cannot remove " .. p.path .. ": " .. trim(r.stderr)) end
  else
    h:write(p.path, changes.want, { mode = st.exists and st.mode or "0644" })
  end

  local spec = "user=" .. user .. ",host=" .. conn.host .. ",addr=" .. conn.addr ..
    (conn.laddr and (",laddr=" .. conn.laddr .. ",lport=" .. conn.lport) or "")
  local r = h:raw(table.concat({
    "s=" .. quote(st.sshd),
    "out=$(\"$s\" -t 2>&1); rc=$?",
    "if [ $rc -ne 0 ]; then printf '%s\\n' \"$out\"; exit 10; fi",
    "printf 'groups %s\\n' \"$(id -Gn -- " .. quote(user) .. ")\"",
    "\"$s\" -T -C " .. quote(spec) .. " 2>&1 || exit 11",
  }, "\n"))
  local what = p.state == "absent" and "without " .. p.path or "with this " .. p.path
  if r.code == 10 then
    put_back(h, p, st)
    fail("`sshd -t` rejects the config " .. what .. ", so it was not applied (" ..
      (st.exists and "the previous file was restored" or "the new file was removed") .. "): " .. trim(r.stdout))
  elseif r.code ~= 0 then
    put_back(h, p, st)
    fail("`sshd -T -C " .. spec .. "` failed, so the config was not applied: " .. trim(r.stdout .. r.stderr))
  end
  local eff, groups = {}, {}
  for l in r.stdout:gmatch("[^\n]+") do
    local key, v = l:match("^(%S+)%s*(.*)$")
    if key == "groups" and #groups == 0 then
      for g in v:gmatch("%S+") do groups[#groups + 1] = g end
    elseif key then
      eff[key] = eff[key] or {}
      table.insert(eff[key], v)
    end
  end
  local method = h.conn.password and "password" or "publickey"
  local why = lockout(eff, user, groups, method, conn)
  if why then
    put_back(h, p, st)
    fail("refused: the config " .. what .. " would lock out " .. user .. " (kengine's login): " .. why ..
      "; nothing was changed")
  end
  if p.state == "present" then
    local lost = overridden(eff, p.settings)
    if #lost > 0 then
      put_back(h, p, st)
      fail("refused: these settings would not take effect because an earlier file or line sets them " ..
        "(sshd keeps the first value; drop-ins are read in name order): " .. table.concat(lost, ", ") ..
        "; nothing was changed")
    end
  end
  if not p.reload then return end
  local pidfile = eff.pidfile and eff.pidfile[1]
  local how, rerr = reload(h, pidfile)
  if not how then
    put_back(h, p, st)
    fail("cannot reload sshd (" .. rerr .. "); the previous config was put back")
  end
  local ok, cerr = new_connection(h)
  if not ok then
    put_back(h, p, st)
    local again = reload(h, pidfile)
    local back = again and new_connection(h)
    fail("a new SSH connection failed after the reload (" .. tostring(cerr) .. "); the previous config was " ..
      "put back" .. (not again and " but sshd could not be reloaded again"
        or back and " and sshd reloaded (new connections work again)"
        or " and sshd reloaded, but new connections still fail"))
  end
  return { msg = changes.summary .. "; validated, reloaded (" .. how .. "), new connection ok", reloaded = how }
end

return recipe.resource {
  name = "sshd",
  description = "an sshd_config drop-in: validated with sshd -t, refused if it locks kengine out, reloaded",
  defaults = { state = "present", path = DEFAULT_PATH, main_config = "/etc/ssh/sshd_config", reload = true },
  label = function(p) return p.path end,
  validate = validate,
  probe = probe,
  diff = diff,
  apply = apply,
}
