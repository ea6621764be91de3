--- rancher: Rancher v2.x in a container behind nginx, bootstrapped through its API.
-- The container gets a pinned image, a state volume and the bootstrap password
-- through CATTLE_BOOTSTRAP_PASSWORD (an env file, never a command line); once
-- /ping answers, the controller logs in (/v1-public/login, falling back to
-- /v3-public), sets the admin password, server-url, and stores an API token on
-- the server (root-only) for later runs.  A re-run on a bootstrapped Rancher
-- changes nothing and needs no bootstrap password.
--
-- vars:
--   rancher_image        pinned image                                  ("rancher/rancher:v2.13.1")
--   rancher_sim          run the API simulator instead (the lab)       (false)
--   rancher_sim_base     controller path of an image tarball with python3, for the simulator image (nil)
--   rancher_port         where the container listens on the server     (8080 for the simulator, 8443)
--   rancher_url          how the controller reaches Rancher            ("https://<server_name>", lab: 127.0.0.1:<https port>)
--   server_url           Rancher's server-url setting                  ("https://<server_name>")
--   rancher_cacert       controller path of the CA to verify rancher_url (nil: the nginx certificate of the server)
-- secrets (environment of the controller):
--   KENGINE_RANCHER_BOOTSTRAP_PASSWORD  first start only
--   KENGINE_RANCHER_ADMIN_PASSWORD      the admin password to set (≥ 12 characters)
local k = require "kengine"
local mission = require "kengine.mission"

return k.recipe {
  name = "rancher",
  hosts = "servers",
  sudo = true,
  vars = { rancher_image = "rancher/rancher:v2.13.1", rancher_sim = false },
  run = function(h)
    local v = h.vars
    local port = v.rancher_port or (v.rancher_sim and 8080 or 8443)
    local image = v.rancher_image
    if v.rancher_sim then image = mission.rancher_sim_image(h) end

    -- The bootstrap password reaches the container through an env file
    -- (root-only), not the container spec: a later run without it must not
    -- see a changed spec and re-create Rancher.
    local boot = k.secret_env("KENGINE_RANCHER_BOOTSTRAP_PASSWORD")
    h:file { path = "/opt/rancher", state = "directory", mode = "0700" }
    if boot then
      h:file { path = "/opt/rancher/bootstrap.env", mode = "0600",
        content = "CATTLE_BOOTSTRAP_PASSWORD=" .. boot .. "\n" }  -- string .. secret is a secret
    elseif not h:read("/opt/rancher/bootstrap.env") then
      if h.check then h:log("first run: KENGINE_RANCHER_BOOTSTRAP_PASSWORD will be needed") return end
      h:fail("first run: set KENGINE_RANCHER_BOOTSTRAP_PASSWORD (Rancher's bootstrap password)")
    end
    local cert = v.tls_cert or mission.NGINX_CERT
    local c = h:docker_container {
      name = "rancher",
      image = image,
      ports = { "127.0.0.1:" .. port .. (v.rancher_sim and ":8080" or ":443") },
      volumes = { "/opt/rancher/data:/var/lib/rancher", cert .. ":/etc/rancher/ssl/cacerts.pem:ro" },
      extra_args = { "--env-file", "/opt/rancher/bootstrap.env" },
      restart = "unless-stopped",
      privileged = not v.rancher_sim,   -- Rancher needs it outside Kubernetes; the simulator does not
    }
    if h.check and c.changed then
      h:log("Rancher would be (re)started: its API bootstrap follows on a real run")
      return
    end

    local api = mission.rancher_api(h)
    local admin = k.secret_env("KENGINE_RANCHER_ADMIN_PASSWORD")
    if not admin then h:fail("set KENGINE_RANCHER_ADMIN_PASSWORD (the Rancher admin password, 12+ characters)") end
    h:rancher_bootstrap { url = api.url, cacert = api.cacert, admin_password = admin, bootstrap_password = boot }
    h:rancher_setting { url = api.url, cacert = api.cacert, name = "server-url", value = mission.server_url(h) }
  end,
}
