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

    local env = {}
    local boot = k.secret_env("KENGINE_RANCHER_BOOTSTRAP_PASSWORD")
    if boot then env.CATTLE_BOOTSTRAP_PASSWORD = boot end
    h:file { path = "/opt/rancher", state = "directory", mode = "0700" }
    h:docker_container {
      name = "rancher",
      image = image,
      ports = { "127.0.0.1:" .. port .. (v.rancher_sim and ":8080" or ":443") },
      volumes = { "/opt/rancher:/var/lib/rancher" },
      env = env,
      restart = "unless-stopped",
      privileged = not v.rancher_sim,   -- Rancher needs it outside Kubernetes; the simulator does not
      command = v.rancher_sim and mission.rancher_sim_command() or nil,
    }

    local api = mission.rancher_api(h)
    local admin = k.secret_env("KENGINE_RANCHER_ADMIN_PASSWORD")
    if not admin then h:fail("set KENGINE_RANCHER_ADMIN_PASSWORD (the Rancher admin password, 12+ characters)") end
    h:rancher_bootstrap { url = api.url, cacert = api.cacert, admin_password = admin, bootstrap_password = boot }
    h:rancher_setting { url = api.url, cacert = api.cacert, name = "server-url", value = mission.server_url(h) }
  end,
}
