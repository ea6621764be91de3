--- nginx: nginx as the public entry — TLS, a reverse proxy to Rancher, the
-- default site replaced.
--
-- vars:
--   server_name       the public name                                   ("_", any)
--   tls_cert/tls_key  paths on the server of a certificate and key; without
--                     them a self-signed certificate is generated once   (nil)
--   rancher_upstream  where Rancher listens on the server     ("127.0.0.1:8443"; the simulator: 127.0.0.1:8080)
--   rancher_upstream_tls  the upstream speaks HTTPS            (true for Rancher, false for the simulator)
local k = require "kengine"
local mission = require "kengine.mission"

return k.recipe {
  name = "nginx",
  hosts = "servers",
  sudo = true,
  vars = { server_name = "_" },
  run = function(h)
    local v = h.vars
    h:nginx {}
    local port = v.rancher_port or (v.rancher_sim and 8080 or 8443)
    local upstream = v.rancher_upstream or ("127.0.0.1:" .. port)
    local upstream_tls = v.rancher_upstream_tls
    if upstream_tls == nil then upstream_tls = not v.rancher_sim end
    local tls = (v.tls_cert and v.tls_key) and { cert = v.tls_cert, key = v.tls_key } or { self_signed = true }
    -- the certificate covers the public name, and localhost/127.0.0.1 for
    -- kubectl on the server and for the controller through a forwarded port
    local names = { mission.server_name(h) }
    for _, n in ipairs({ "localhost", "127.0.0.1" }) do
      if n ~= names[1] then names[#names + 1] = n end
    end
    h:nginx_site {
      name = "rancher",
      server_name = names,
      default = true,
      listen = 443,
      tls = tls,
      upstream = { upstream },
      upstream_tls = upstream_tls,
      websocket = true,
      redirect_http = false,
    }
  end,
}
