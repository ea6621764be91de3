--- kubectl: kubectl on the server, configured for the admin users (the
-- kubeconfig pushed to ~/.kube/config with mode 0600), and a
-- `kubectl get nodes`-style check run as each user.
--
-- vars:
--   admin_users      as in base.lua                                     ({})
--   kubectl_package  Debian/Ubuntu package providing kubectl            ("kubernetes-client")
--                    (on Ubuntu, add Kubernetes' own apt repository with apt_repository and use "kubectl")
local k = require "kengine"
local mission = require "kengine.mission"

return k.recipe {
  name = "kubectl",
  hosts = "servers",
  sudo = true,
  vars = { admin_users = {}, kubectl_package = "kubernetes-client" },
  run = function(h)
    h:package { name = h.vars.kubectl_package, update_cache = true, cache_valid_time = 3600 }
    local kubeconfig = h:read(h.vars.kubeconfig_path or mission.KUBECONFIG)
    if not kubeconfig then
      if h.check then return end
      h:fail("no kubeconfig on the server: run the kubernetes recipe first")
    end
    local users = { { name = "root", home = "/root" } }
    for _, u in ipairs(h.vars.admin_users) do users[#users + 1] = { name = u.name, home = "/home/" .. u.name } end
    for _, u in ipairs(users) do
      h:file { path = u.home .. "/.kube", state = "directory", mode = "0700", owner = u.name, group = u.name }
      h:file { path = u.home .. "/.kube/config", content = k.secret(kubeconfig), mode = "0600",
        owner = u.name, group = u.name }
      -- (kubectl 1.20's get --raw drops the server's path prefix, /k8s/clusters/local)
      local r = h:exec("su -s /bin/sh -c 'kubectl get nodes -o json' " .. u.name,
        { check_safe = true, changed_when = false })
      if not h.check then
        local nodes = k.json.decode(r.stdout)
        if type(nodes) ~= "table" or type(nodes.items) ~= "table" then
          h:fail("kubectl as " .. u.name .. " did not list nodes: " .. r.stdout:sub(1, 200))
        end
        h:log("kubectl as " .. u.name .. ": " .. #nodes.items .. " node(s)")
      end
    end
  end,
}
