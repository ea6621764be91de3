--- nginx and nginx_site: nginx installed and running, and sites it serves.
-- h:nginx{ package = "nginx" }
-- h:nginx_site{ name =, server_name = "_" or {…}, listen = 80 (443 with tls) or {…},
--               tls = { cert = "/path", key = "/path" } or { self_signed = true, days = 3650 },
--               redirect_http = false, http2 = false, ipv6 = true, default = false,
--               upstream = { "127.0.0.1:8081", … }, balance = nil|"least_conn"|"ip_hash"|…, upstream_tls = false,
--               websocket = false, proxy_read_timeout = nil, root = nil,
--               locations = { { path =, proxy = true|"http://…", root =, raw = "…" }, … } or { ["/p"] = "raw" },
--               extra = "raw server-level directives", state = "present"|"absent" }
--
-- A site is one file, /etc/nginx/sites-available/NAME linked from
-- sites-enabled (Debian/Ubuntu layout), or /etc/nginx/conf.d/NAME.conf where
-- there is no sites-available.  A change is applied in one round trip: back
-- up the current files, install the new ones, `nginx -t`, and reload — or, when
-- the test fails, put every file back as it was and fail the step with
-- nginx's message.  A broken config is never left in place and never
-- reloaded: the running nginx keeps serving the old one.
local recipe = require "kengine.recipe"
local quote = require("kengine.host").quote
local package = require "kengine.resources.package"

local M = {}

local function fail(msg) error(msg, 0) end

local trim = require("kengine.host").trim

local tail = require("kengine.host").tail


-- nginx running: systemd's view, else the pid file's
local RUNNING = [[
running() {
  if [ -d /run/systemd/system ]; then systemctl is-active --quiet nginx; return; fi
  p=$(cat /run/nginx.pid 2>/dev/null) && [ -n "$p" ] && kill -0 "$p" 2>/dev/null
}
start_nginx() {
  if [ -d /run/systemd/system ]; then systemctl enable nginx >/dev/null 2>&1; systemctl start nginx; return; fi
  service nginx start >/dev/null 2>&1 || nginx
}
reload_nginx() {
  if ! running; then start_nginx; return; fi
  if [ -d /run/systemd/system ]; then systemctl reload nginx; else nginx -s reload; fi
}
]]

---------------------------------------------------------------------------
-- nginx

M.nginx = recipe.resource {
  name = "nginx",
  description = "nginx installed and running",
  defaults = { package = "nginx", state = "present" },
  label = function(p) return p.package ~= "nginx" and p.package or "" end,
  validate = function(p)
    if p.state ~= "present" then return false, "state must be 'present'" end
    if type(p.package) ~= "string" or not p.package:match("^[%w][%w+.%-]*$") then
      return false, "package must be a package name (nginx, nginx-light, nginx-full, …)"
    end
    return true
  end,
  probe = function(h, p)
    local res = h:batch({
      "dpkg-query -W -f='${db:Status-Abbrev}' " .. quote(p.package) .. " 2>/dev/null",
      RUNNING .. "running",
    })
    return { installed = res[1].out:sub(1, 2) == "ii", running = res[2].rc == 0 }
  end,
  diff = function(_, p, st)
    local what, fields = {}, {}
    if not st.installed then what[#what + 1] = "install " .. p.package; fields.install = p.package end
    if not st.running then what[#what + 1] = "start nginx"; fields.running = true end
    if #what == 0 then return nil end
    return { summary = table.concat(what, ", "), fields = fields, install = not st.installed }
  end,
  apply = function(h, p, _, ch)
    if ch.install then
      local pp = { name = { p.package }, state = "present", update_cache = true, cache_valid_time = 3600,
        lock_timeout = 300 }
      local st = package.probe(h, pp)
      local c = package.diff(h, pp, st)
      if c then package.apply(h, pp, st, c) end
    end
    local r = h:raw(RUNNING .. "running && exit 0\n" ..
      "out=$(nginx -t 2>&1) || { printf '%s\\n' \"$out\" >&2; exit 2; }\n" ..
      "start_nginx || exit 3\n" ..
      "i=0; while ! running && [ $i -lt 20 ]; do sleep 0.25; i=$((i+1)); done; running || exit 3")
    if r.code == 2 then fail("nginx does not start, its configuration is invalid:\n" .. tail(r.stderr, 6)) end
    if r.code ~= 0 then fail("nginx did not start: " .. tail(r.stderr ~= "" and r.stderr or r.stdout, 6)) end
  end,
}

---------------------------------------------------------------------------
-- nginx_site

local SSL_DIR = "/etc/nginx/ssl"

local function list(v)
  if v == nil then return {} end
  if type(v) ~= "table" then return { v } end
  return v
end

local function ident(name) return (name:gsub("[^%w_]", "_")) end

-- nothing that could end a directive or a block where a single word is expected
local function plain(v) return type(v) == "string" and v ~= "" and not v:find("[;{}%s\"'\\]") end

local function cert_paths(p)
  if not p.tls then return nil end
  if p.tls.self_signed then return SSL_DIR .. "/" .. p.name .. ".crt", SSL_DIR .. "/" .. p.name .. ".key" end
  return p.tls.cert, p.tls.key
end

local function locations_of(p)
  local locs = {}
  if p.locations then
    if #p.locations > 0 then
      for _, l in ipairs(p.locations) do locs[#locs + 1] = l end
    else
      local paths = {}
      for path in pairs(p.locations) do paths[#paths + 1] = path end
      table.sort(paths)
      for _, path in ipairs(paths) do locs[#locs + 1] = { path = path, raw = p.locations[path] } end
    end
  end
  local has_root = false
  for _, l in ipairs(locs) do if l.path == "/" then has_root = true end end
  if not has_root then
    if p.upstream then
      table.insert(locs, 1, { path = "/", proxy = true })
    elseif p.root then
      table.insert(locs, 1, { path = "/", raw = "try_files $uri $uri/ =404;" })
    end
  end
  return locs
end

-- raw directives, re-indented: their common leading whitespace replaced by pad
local function indent(text, pad)
  local lines, min = {}, math.huge
  for l in (text:gsub("^\n+", ""):gsub("%s+$", "") .. "\n"):gmatch("(.-)\n") do
    lines[#lines + 1] = l
    if l:find("%S") then min = math.min(min, #l:match("^%s*")) end
  end
  for i, l in ipairs(lines) do lines[i] = l:find("%S") and (pad .. l:sub(min + 1)) or "" end
  return table.concat(lines, "\n")
end

--- The site file for the parameters (exposed for tests).
function M.render(p)
  local id = ident(p.name)
  local out = { "# " .. p.name .. ": written by kengine (nginx_site); local changes are overwritten", "" }
  local function add(s) out[#out + 1] = s end
  local upstream = "kengine_" .. id
  local upgrade = "$kengine_" .. id .. "_connection"
  if p.upstream then
    add("upstream " .. upstream .. " {")
    if p.balance then add("    " .. p.balance .. ";") end
    for _, s in ipairs(list(p.upstream)) do add("    server " .. s .. ";") end
    add("}")
    add("")
  end
  if p.websocket then
    add("map $http_upgrade " .. upgrade .. " {")
    add("    default upgrade;")
    add("    ''      close;")
    add("}")
    add("")
  end
  local names = table.concat(list(p.server_name), " ")
  local ports = list(p.listen or (p.tls and 443 or 80))
  local function listens(port_list, ssl)
    for _, l in ipairs(port_list) do
      local flags = (ssl and " ssl" or "") .. (ssl and p.http2 and " http2" or "") .. (p.default and " default_server" or "")
      add("    listen " .. tostring(l) .. flags .. ";")
      if p.ipv6 and tostring(l):match("^%d+$") then add("    listen [::]:" .. tostring(l) .. flags .. ";") end
    end
  end
  add("server {")
  listens(ports, p.tls ~= nil)
  add("    server_name " .. names .. ";")
  if p.tls then
    local cert, key = cert_paths(p)
    add("")
    add("    ssl_certificate " .. cert .. ";")
    add("    ssl_certificate_key " .. key .. ";")
    add("    ssl_protocols " .. (p.tls.protocols or "TLSv1.2 TLSv1.3") .. ";")
  end
  if p.root then add(""); add("    root " .. p.root .. ";") end
  if p.extra then add(""); add(indent(p.extra, "    ")) end
  local scheme = p.upstream_tls and "https" or "http"
  for _, l in ipairs(locations_of(p)) do
    add("")
    add("    location " .. l.path .. " {")
    if l.root then add("        root " .. l.root .. ";") end
    if l.proxy then
      local target = l.proxy == true and (scheme .. "://" .. upstream) or l.proxy
      add("        proxy_pass " .. target .. ";")
      add("        proxy_http_version 1.1;")
      add("        proxy_set_header Host $host;")
      add("        proxy_set_header X-Real-IP $remote_addr;")
      add("        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;")
      add("        proxy_set_header X-Forwarded-Proto $scheme;")
      add("        proxy_set_header X-Forwarded-Port $server_port;")
      if p.websocket then
        add("        proxy_set_header Upgrade $http_upgrade;")
        add("        proxy_set_header Connection " .. upgrade .. ";")
        add("        proxy_buffering off;")
      else
        add("        proxy_set_header Connection \"\";")
      end
      local rt = p.proxy_read_timeout or (p.websocket and "900s")
      if rt then add("        proxy_read_timeout " .. tostring(rt) .. ";") end
      if p.upstream_tls and l.proxy == true then
        add("        proxy_ssl_server_name on;")
        add("        proxy_ssl_verify off;")
      end
    end
    if l.raw then add(indent(l.raw, "        ")) end
    add("    }")
  end
  add("}")
  if p.tls and p.redirect_http then
    add("")
    add("server {")
    listens(list(p.redirect_http == true and 80 or p.redirect_http), false)
    add("    server_name " .. names .. ";")
    local port = tostring(ports[1]):match("(%d+)$")
    add("    return 301 https://$host" .. ((port and port ~= "443") and (":" .. port) or "") .. "$request_uri;")
    add("}")
  end
  return table.concat(out, "\n") .. "\n"
end

local function layout(p, debian)
  if debian then
    return { file = "/etc/nginx/sites-available/" .. p.name, link = "/etc/nginx/sites-enabled/" .. p.name,
      default = "/etc/nginx/sites-enabled/default" }
  end
  return { file = "/etc/nginx/conf.d/" .. p.name .. ".conf", default = "/etc/nginx/conf.d/default.conf" }
end

local function probe(h, p)
  local cert, key = cert_paths(p)
  local res = h:batch({
    "[ -d /etc/nginx/sites-available ] || [ ! -d /etc/nginx/conf.d ]",
    "readlink /etc/nginx/sites-enabled/" .. quote(p.name),
    "[ -e /etc/nginx/sites-enabled/default ] || [ -L /etc/nginx/sites-enabled/default ] || " ..
      "[ -e /etc/nginx/conf.d/default.conf ]",
    (cert and ("[ -s " .. quote(cert) .. " ] && [ -s " .. quote(key) .. " ]") or "false"),
    "command -v nginx",
    "[ -d /etc/nginx/sites-available ] && cat /etc/nginx/sites-available/" .. quote(p.name) ..
      " || cat /etc/nginx/conf.d/" .. quote(p.name .. ".conf"),
  })
  local st = { debian = res[1].rc == 0, default_site = res[3].rc == 0, cert = res[4].rc == 0,
    nginx = res[5].rc == 0 }
  st.link = res[2].rc == 0 and trim(res[2].out) or nil
  st.content = res[6].rc == 0 and res[6].out or nil
  st.paths = layout(p, st.debian)
  return st
end

local function diff(_, p, st)
  local paths = st.paths
  if p.state == "absent" then
    if not st.content and not st.link then return nil end
    return { summary = "remove " .. paths.file, before = st.content or "", after = "", name = paths.file,
      fields = { state = "absent" } }
  end
  local want = M.render(p)
  local what, fields = {}, {}
  if p.tls and p.tls.self_signed and not st.cert then
    what[#what + 1] = "generate a self-signed certificate"
    fields.certificate = (cert_paths(p))
  end
  if st.content ~= want then
    what[#what + 1] = (st.content and "update " or "create ") .. paths.file
    fields.content = true
  end
  if paths.link and st.link ~= paths.file then what[#what + 1] = "enable"; fields.enabled = true end
  if p.default and st.default_site then what[#what + 1] = "disable the default site"; fields.default_site = "removed" end
  if #what == 0 then return nil end
  return { summary = table.concat(what, ", "), fields = fields, before = st.content or "", after = want,
    name = paths.file, content = want, gen_cert = fields.certificate ~= nil }
end

local function gen_cert(h, p)
  local cert, key = cert_paths(p)
  local cn = p.name
  local sans = {}
  for _, n in ipairs(list(p.server_name)) do
    if n ~= "_" and n ~= "" and not n:find("[~*]") then
      if cn == p.name then cn = n end
      sans[#sans + 1] = (n:match("^[%d.]+$") and "IP:" or "DNS:") .. n
    end
  end
  if #sans == 0 then sans[1] = "DNS:" .. cn end
  local script = table.concat({
    "command -v openssl >/dev/null || { echo 'openssl is not installed' >&2; exit 1; }",
    "umask 077; mkdir -p " .. SSL_DIR .. " || exit 1",
    "d=$(mktemp -d " .. SSL_DIR .. "/.kengine-XXXXXX) || exit 1; trap 'rm -rf \"$d\"' EXIT",
    "openssl req -x509 -newkey rsa:2048 -sha256 -nodes -days " .. math.tointeger(p.tls.days or 3650) ..
      " -subj " .. quote("/CN=" .. cn) .. " -addext " .. quote("subjectAltName=" .. table.concat(sans, ",")) ..
      " -keyout \"$d/key\" -out \"$d/crt\" 2>\"$d/err\" || { cat \"$d/err\" >&2; exit 1; }",
    "chmod 0600 \"$d/key\" && chmod 0644 \"$d/crt\" || exit 1",
    -- the key first: a certificate never lands without its key
    "mv -f \"$d/key\" " .. quote(key) .. " && mv -f \"$d/crt\" " .. quote(cert),
  }, "\n")
  local r = h:raw(script)
  if r.code ~= 0 then fail("cannot generate the self-signed certificate: " .. tail(r.stderr, 4)) end
end

-- install (or remove) the site's files, nginx -t, reload; on a failed test
-- every file goes back as it was and nginx is not touched
local function install(h, p, st, ch)
  local paths = st.paths
  local lines = {
    RUNNING,
    "command -v nginx >/dev/null || { echo 'nginx is not installed (h:nginx{} installs it)' >&2; exit 10; }",
    "f=" .. quote(paths.file),
    "l=" .. (paths.link and quote(paths.link) or "''"),
    "dl=" .. quote(paths.default),
    "b=$(mktemp -d \"${TMPDIR:-/tmp}/kengine-nginx.XXXXXX\") || exit 1; trap 'rm -rf \"$b\"' EXIT",
    "cat > \"$b/new\" || exit 1",
    "[ -e \"$f\" ] && { cp -p \"$f\" \"$b/file\" || exit 1; }",
    "[ -n \"$l\" ] && { [ -e \"$l\" ] || [ -L \"$l\" ]; } && { cp -P \"$l\" \"$b/link\" || exit 1; }",
    "{ [ -e \"$dl\" ] || [ -L \"$dl\" ]; } && { cp -P -p \"$dl\" \"$b/default\" || exit 1; }",
    -- put SRC DEST: copy (a file or a symlink) beside DEST, then rename over it
    "put() { t=\"$(dirname \"$2\")/.kengine-$$\"; rm -f \"$t\"; cp -P -p \"$1\" \"$t\" && mv -Tf \"$t\" \"$2\"; }",
    "restore() {",
    "  if [ -e \"$b/file\" ]; then put \"$b/file\" \"$f\"; else rm -f \"$f\"; fi",
    "  if [ -n \"$l\" ]; then if [ -e \"$b/link\" ] || [ -L \"$b/link\" ]; then put \"$b/link\" \"$l\"; " ..
      "else rm -f \"$l\"; fi; fi",
    "  if [ -e \"$b/default\" ] || [ -L \"$b/default\" ]; then put \"$b/default\" \"$dl\"; fi",
    "}",
  }
  local function add(s) lines[#lines + 1] = s end
  if p.state == "absent" then
    add("rm -f \"$f\"; [ -n \"$l\" ] && rm -f \"$l\"")
  else
    if paths.link then
      if ch.tls_check then add(ch.tls_check) end
      add("chmod 0644 \"$b/new\" && put \"$b/new\" \"$f\" || { restore; exit 1; }")
      add("ln -sfn \"$f\" \"$b/newlink\" && put \"$b/newlink\" \"$l\" || { restore; exit 1; }")
    else
      if ch.tls_check then add(ch.tls_check) end
      add("chmod 0644 \"$b/new\" && put \"$b/new\" \"$f\" || { restore; exit 1; }")
    end
    if p.default then add("rm -f \"$dl\"") end
  end
  add("if ! out=$(nginx -t 2>&1); then restore; printf '%s\\n' \"$out\" >&2; exit 20; fi")
  add("reload_nginx >\"$b/reload\" 2>&1 || { cat \"$b/reload\" >&2; exit 30; }")
  local r = h:raw(table.concat(lines, "\n"), { stdin = ch.content or "" })
  if r.code == 10 then fail(trim(r.stderr)) end
  if r.code == 11 then fail(trim(r.stderr)) end
  if r.code == 20 then
    fail("nginx -t failed; the previous configuration was restored and nginx was not reloaded:\n" ..
      tail(r.stderr, 6))
  end
  if r.code == 30 then fail("nginx reload failed: " .. tail(r.stderr, 6)) end
  if r.code ~= 0 then fail("cannot install " .. paths.file .. ": " .. tail(r.stderr, 4)) end
end

M.nginx_site = recipe.resource {
  name = "nginx_site",
  description = "an nginx site (server block), tested with nginx -t before reload",
  defaults = { state = "present", server_name = "_", redirect_http = false, http2 = false, ipv6 = true,
    default = false, websocket = false, upstream_tls = false },
  label = function(p) return p.name end,
  validate = function(p)
    if type(p.name) ~= "string" or not p.name:match("^[%w][%w_.%-]*$") then
      return false, "name must be a file name ([a-zA-Z0-9][a-zA-Z0-9_.-]*)"
    end
    if p.name == "default" then return false, "the name 'default' is Debian's own site; use default = true" end
    if p.state ~= "present" and p.state ~= "absent" then return false, "state must be 'present' or 'absent'" end
    if p.state == "absent" then return true end
    for _, n in ipairs(list(p.server_name)) do
      if not plain(n) then return false, "server_name: invalid name '" .. tostring(n) .. "'" end
    end
    for _, l in ipairs(list(p.listen)) do
      if not (math.type(l) == "integer" or plain(l)) then return false, "listen: invalid '" .. tostring(l) .. "'" end
    end
    if p.tls ~= nil then
      if type(p.tls) ~= "table" then return false, "tls must be { cert =, key = } or { self_signed = true }" end
      if not p.tls.self_signed then
        if not plain(p.tls.cert) or p.tls.cert:sub(1, 1) ~= "/" or not plain(p.tls.key) or p.tls.key:sub(1, 1) ~= "/"
        then
          return false, "tls: cert and key must be absolute paths on the target (or self_signed = true)"
        end
      end
      if p.tls.days ~= nil and math.type(p.tls.days) ~= "integer" then return false, "tls.days must be an integer" end
    elseif p.redirect_http then
      return false, "redirect_http needs tls"
    end
    if p.upstream ~= nil then
      local ups = list(p.upstream)
      if #ups == 0 then return false, "upstream: at least one server" end
      for _, u in ipairs(ups) do
        if type(u) ~= "string" or u:find("[;{}\"'\\]") or u == "" then
          return false, "upstream: invalid server '" .. tostring(u) .. "'"
        end
      end
    end
    if p.balance ~= nil and (type(p.balance) ~= "string" or p.balance:find("[;{}]")) then
      return false, "balance must be an nginx upstream method like 'least_conn' or 'ip_hash'"
    end
    if p.root ~= nil and not plain(p.root) then return false, "root must be a path" end
    if p.locations ~= nil then
      if type(p.locations) ~= "table" then return false, "locations must be a list or a table path = directives" end
      if #p.locations > 0 then
        for i, l in ipairs(p.locations) do
          if type(l) ~= "table" or type(l.path) ~= "string" or l.path:find("[;{}]") then
            return false, "locations[" .. i .. "]: { path = , … } expected"
          end
          if l.proxy == true and not p.upstream then
            return false, "locations[" .. i .. "]: proxy = true needs an upstream"
          end
        end
      else
        for path, raw in pairs(p.locations) do
          if type(path) ~= "string" or path:find("[;{}]") or type(raw) ~= "string" then
            return false, "locations: path = \"directives\" expected"
          end
        end
      end
    end
    return true
  end,
  probe = probe,
  diff = diff,
  apply = function(h, p, st, ch)
    if p.state == "present" and ch.gen_cert then gen_cert(h, p) end
    if p.state == "present" and p.tls and not p.tls.self_signed then
      ch.tls_check = "for x in " .. quote(p.tls.cert) .. " " .. quote(p.tls.key) .. "; do [ -r \"$x\" ] || " ..
        "{ echo \"tls: $x does not exist on the target\" >&2; exit 11; }; done"
    end
    install(h, p, st, ch)
  end,
}
M.nginx_site.params_own = { name = true }

return M
