-- nginx and nginx_site against a real Debian lab host (no systemd: nginx runs from its init script).
-- Two backends (python3's http.server, each serving its own name) listen on 127.0.0.1 inside the host;
-- the site balances over them.  Every state is checked directly: files and nginx -t over a separate SSH
-- session, requests with curl inside the host and with k.http from here through the host's HTTP/HTTPS
-- ports published on 127.0.0.1.
local k = require "kengine"
local H = require "helpers"

local HOST, S, HTTP_PORT, HTTPS_PORT
local RND = tostring(math.random(1e8))
local LB = "kglb-" .. RND
local LB_NAME = "lb-" .. RND .. ".test"
local TLS = "kgtls-" .. RND
local TLS_NAME = "tls-" .. RND .. ".test"
local B1, B2 = 18181, 18182
local AVAIL = "/etc/nginx/sites-available/"


local kit = H.lab_kit(function() return HOST, S end)
local sh, recipe, run = kit.sh, kit.recipe, kit.run
local function trim(s) return (s:gsub("%s+$", "")) end



local function lb_site(extra)
  return string.format('h:nginx_site { name = %q, server_name = %q, upstream = %s, default = true%s }', LB, LB_NAME,
    extra and extra.upstream or string.format('{ "127.0.0.1:%d", "127.0.0.1:%d" }', B1, B2), extra and extra.more or "")
end

-- the backends that answered n requests (curl inside the host), after a reload has settled (bounded)
local function backends(n, want)
  local seen
  for _ = 1, 20 do
    seen = {}
    for _ = 1, n do
      local out = sh("curl -s --max-time 2 -H 'Host: " .. LB_NAME .. "' http://127.0.0.1/", true)
      seen[trim(out)] = true
    end
    local ok = true
    for _, b in ipairs(want) do if not seen[b] then ok = false end end
    for b in pairs(seen) do
      local wanted = false
      for _, w in ipairs(want) do if w == b then wanted = true end end
      if not wanted then ok = false end
    end
    if ok then return seen end
    k.sleep(0.2)
  end
  return seen
end

local function file(path)
  local out, code = sh("cat " .. path .. " 2>/dev/null", true)
  return code == 0 and out or nil
end

describe("nginx resources on a lab host", function()
  setup(function()
    local lab = H.lab()
    HOST = lab.name .. "-2"
    HTTP_PORT = lab.hosts[HOST].vars.lab_http_port
    HTTPS_PORT = lab.hosts[HOST].vars.lab_https_port
    S = H.lab_connect(HOST)
    -- two backends on the host's loopback, each answering with its own name
    for i, port in ipairs({ B1, B2 }) do
      sh(string.format("[ -f /run/kg-b%d.pid ] && kill $(cat /run/kg-b%d.pid) 2>/dev/null; " ..
        "mkdir -p /srv/kg-b%d && echo backend-%d > /srv/kg-b%d/index.html; " ..
        "(cd /srv/kg-b%d && exec setsid python3 -m http.server %d --bind 127.0.0.1) >/dev/null 2>&1 </dev/null & " ..
        "echo $! > /run/kg-b%d.pid", i, i, i, i, i, i, port, i))
    end
    for _, port in ipairs({ B1, B2 }) do
      local up
      for _ = 1, 50 do
        if select(2, sh("curl -sf -o /dev/null http://127.0.0.1:" .. port .. "/", true)) == 0 then up = true; break end
        k.sleep(0.1)
      end
      assert(up, "backend on port " .. port .. " did not start")
    end
  end)

  teardown(function()
    if S then
      sh("kill $(cat /run/kg-b1.pid /run/kg-b2.pid) 2>/dev/null; rm -f /run/kg-b1.pid /run/kg-b2.pid", true)
      S:close()
    end
  end)

  it("installs nginx and starts it without systemd", function()
    local path = recipe("h:nginx {}")
    local _, fresh = sh("command -v nginx", true)
    fresh = fresh ~= 0
    local c = run(path, "--check")
    assert.equal(0, c.code, c.out)
    if fresh then
      assert.equal(1, c.recap.changed, c.out)
      assert.matches("install nginx", c.out, 1, true)
      assert.are_not.equal(0, select(2, sh("command -v nginx", true)))
    end
    local r = run(path)
    assert.equal(0, r.code, r.out)
    assert.equal(fresh and 1 or 0, r.recap.changed, r.out)
    assert.equal(0, select(2, sh("kill -0 $(cat /run/nginx.pid)", true)), "nginx is not running")
    local again = run(path)
    assert.equal(0, again.code, again.out)
    assert.equal(0, again.recap.changed, again.out)
  end)

  it("serves a site that balances over two backends (check, diff, idempotence)", function()
    local path = recipe(lb_site())
    local c = run(path, "--check", "--diff")
    assert.equal(0, c.code, c.out)
    assert.equal(1, c.recap.changed, c.out)
    assert.matches("+upstream kengine_" .. LB:gsub("-", "_") .. " {", c.out, 1, true)
    assert.matches("+    server 127.0.0.1:" .. B2 .. ";", c.out, 1, true)
    assert.is_nil(file(AVAIL .. LB), "check mode wrote the site")

    local r = run(path)
    assert.equal(0, r.code, r.out)
    assert.equal(1, r.recap.changed, r.out)
    assert.equal(AVAIL .. LB, trim(sh("readlink /etc/nginx/sites-enabled/" .. LB)))
    assert.are_not.equal(0, select(2, sh("test -e /etc/nginx/sites-enabled/default", true)), "default site kept")
    sh("nginx -t 2>&1")
    local seen = backends(10, { "backend-1", "backend-2" })
    assert.is_true(seen["backend-1"] and seen["backend-2"], "requests did not reach both backends")

    -- from this machine, through the host's published port 80 (127.0.0.1 only)
    local got = {}
    for _ = 1, 10 do
      local res = assert(k.http.get("http://127.0.0.1:" .. HTTP_PORT .. "/", { headers = { Host = LB_NAME }, timeout = 5 }))
      assert.equal(200, res.status)
      got[trim(res.body)] = true
    end
    assert.is_true(got["backend-1"] and got["backend-2"], "k.http did not reach both backends")

    local again = run(path)
    assert.equal(0, again.code, again.out)
    assert.equal(0, again.recap.changed, again.out)
  end)

  it("shows a changed site as a diff, and applies it", function()
    local path = recipe(lb_site { upstream = string.format('{ "127.0.0.1:%d" }', B1) })
    local before = file(AVAIL .. LB)
    local c = run(path, "--check", "--diff")
    assert.equal(0, c.code, c.out)
    assert.equal(1, c.recap.changed, c.out)
    assert.matches("-    server 127.0.0.1:" .. B2 .. ";", c.out, 1, true)
    assert.equal(before, file(AVAIL .. LB))
    local r = run(path, "--diff")
    assert.equal(0, r.code, r.out)
    assert.equal(1, r.recap.changed, r.out)
    local seen = backends(6, { "backend-1" })
    assert.is_nil(seen["backend-2"])
    assert.is_true(seen["backend-1"])
    -- back to two backends for what follows
    assert.equal(0, run(recipe(lb_site())).code)
    backends(10, { "backend-1", "backend-2" })
  end)

  it("never leaves a broken config in place: nginx -t fails, the old files come back, the old config serves", function()
    local before = file(AVAIL .. LB)
    local bad = recipe(lb_site { more = ', locations = { ["/bad"] = "bogus_directive on;" }' })
    local r = run(bad)
    assert.are_not.equal(0, r.code)
    assert.equal(1, r.recap.failed, r.out)
    assert.matches("nginx -t failed", r.out, 1, true)
    assert.matches('unknown directive "bogus_directive"', r.out, 1, true)
    assert.equal(before, file(AVAIL .. LB))
    assert.equal(AVAIL .. LB, trim(sh("readlink /etc/nginx/sites-enabled/" .. LB)))
    sh("nginx -t 2>&1")
    local seen = backends(10, { "backend-1", "backend-2" })
    assert.is_true(seen["backend-1"] and seen["backend-2"])

    -- a brand-new broken site leaves no file and no link behind
    local name = "kgbad-" .. RND
    r = run(recipe(string.format('h:nginx_site { name = %q, server_name = "bad.test", root = "/var/www/html", ' ..
      'extra = "bogus_directive on;" }', name)))
    assert.are_not.equal(0, r.code)
    assert.is_nil(file(AVAIL .. name))
    assert.are_not.equal(0, select(2, sh("test -L /etc/nginx/sites-enabled/" .. name, true)))
    sh("nginx -t 2>&1")

    -- a good raw location goes through
    local good = recipe(lb_site { more = ', locations = { ["/raw"] = "return 200 raw-ok;" }' })
    r = run(good)
    assert.equal(0, r.code, r.out)
    local body
    for _ = 1, 20 do
      body = sh("curl -s -H 'Host: " .. LB_NAME .. "' http://127.0.0.1/raw", true)
      if body == "raw-ok" then break end
      k.sleep(0.2)
    end
    assert.equal("raw-ok", body)
  end)

  it("serves TLS with a self-signed certificate made once on the host (key 0600)", function()
    local path = recipe(string.format('h:nginx_site { name = %q, server_name = %q, tls = { self_signed = true }, ' ..
      'upstream = { "127.0.0.1:%d" }, redirect_http = true }', TLS, TLS_NAME, B2))
    local crt, key = "/etc/nginx/ssl/" .. TLS .. ".crt", "/etc/nginx/ssl/" .. TLS .. ".key"
    local c = run(path, "--check")
    assert.equal(0, c.code, c.out)
    assert.matches("generate a self-signed certificate", c.out, 1, true)
    assert.are_not.equal(0, select(2, sh("test -e " .. key, true)))

    local r = run(path)
    assert.equal(0, r.code, r.out)
    assert.equal(1, r.recap.changed, r.out)
    assert.equal("600 root", trim(sh("stat -c '%a %U' " .. key)))
    assert.matches("CN%s*=%s*" .. TLS_NAME:gsub("%p", "%%%0"), sh("openssl x509 -in " .. crt .. " -noout -subject"))
    local fp = sh("openssl x509 -in " .. crt .. " -noout -fingerprint -sha256")

    local res
    for _ = 1, 20 do
      res = k.http.get("https://127.0.0.1:" .. HTTPS_PORT .. "/", { headers = { Host = TLS_NAME }, insecure = true,
        timeout = 5 })
      if res and res.status == 200 then break end
      k.sleep(0.2)
    end
    assert.equal(200, res.status)
    assert.equal("backend-2", trim(res.body))
    -- the certificate served is the one on disk
    local served = sh("echo | openssl s_client -connect 127.0.0.1:443 -servername " .. TLS_NAME ..
      " 2>/dev/null | openssl x509 -noout -fingerprint -sha256")
    assert.equal(fp, served)
    local redirect = sh("curl -s -o /dev/null -w '%{http_code} %{redirect_url}' -H 'Host: " .. TLS_NAME ..
      "' http://127.0.0.1/x")
    assert.equal("301 https://" .. TLS_NAME .. "/x", redirect)

    local again = run(path)
    assert.equal(0, again.code, again.out)
    assert.equal(0, again.recap.changed, again.out)
    assert.equal(fp, sh("openssl x509 -in " .. crt .. " -noout -fingerprint -sha256"), "certificate regenerated")
  end)

  it("removes a site (state = absent) and keeps serving the others", function()
    local path = recipe(string.format('h:nginx_site { name = %q, state = "absent" }', TLS))
    local r = run(path, "--diff")
    assert.equal(0, r.code, r.out)
    assert.equal(1, r.recap.changed, r.out)
    assert.is_nil(file(AVAIL .. TLS))
    assert.are_not.equal(0, select(2, sh("test -L /etc/nginx/sites-enabled/" .. TLS, true)))
    assert.equal(0, run(path).recap.changed)
    local seen = backends(10, { "backend-1", "backend-2" })
    assert.is_true(seen["backend-1"] and seen["backend-2"])
    run(recipe(string.format('h:nginx_site { name = %q, state = "absent" }', LB)))
  end)

  it("renders locations, websocket headers and upstream TLS", function()
    local nginx = require "kengine.resources.nginx"
    local text = nginx.render { name = "r.x", server_name = { "a.test", "b.test" }, listen = 8443, ipv6 = false,
      tls = { cert = "/c.pem", key = "/k.pem" }, upstream = { "10.0.0.1:443" }, upstream_tls = true, websocket = true,
      balance = "least_conn", locations = { { path = "/static/", root = "/srv" }, { path = "/api/", proxy = true } } }
    assert.matches("upstream kengine_r_x {\n    least_conn;\n    server 10.0.0.1:443;\n}", text, 1, true)
    assert.matches("map $http_upgrade $kengine_r_x_connection {", text, 1, true)
    assert.matches("    listen 8443 ssl;\n    server_name a.test b.test;", text, 1, true)
    assert.matches("    location / {\n        proxy_pass https://kengine_r_x;", text, 1, true)
    assert.matches("    location /static/ {\n        root /srv;\n    }", text, 1, true)
    assert.matches("proxy_set_header Connection $kengine_r_x_connection;", text, 1, true)
    assert.matches("proxy_read_timeout 900s;", text, 1, true)
    assert.matches("proxy_ssl_verify off;", text, 1, true)
  end)
end)
