--- nginx: nginx as the public entry — TLS, a reverse proxy to Rancher, the
-- default site replaced.
--
-- vars:
--   server_name       the public name                                   ("_", any)
--   tls_cert/tls_key  paths on the server of a certificate and key; without
--                     them a self-signed certificate is generated once   (nil)
--   rancher_upstream  where Rancher listens on the server                ("127.0.0.1:8080")
--   rancher_upstream_tls  the upstream speaks HTTPS (real Rancher)       (false)
local k = require "kengine"

return k.recipe {
  name = "nginx",
  hosts = "servers",
  sudo = true,
  vars = { server_name = "_", rancher_upstream = "127.0.0.1:8080", rancher_upstream_tls = false },
  run = function(h)
    local v = h.vars
    h:nginx {}
    local tls = (v.tls_cert and v.tls_key) and { cert = v.tls_cert, key = v.tls_key } or { self_signed = true }
    h:nginx_site {
      name = "rancher",
      server_name = v.server_name,
      listen = 443,
      tls = tls,
      upstream = { v.rancher_upstream },
      upstream_tls = v.rancher_upstream_tls,
      websocket = true,
      redirect_http = false,
    }
  end,
}
