--- kubernetes: a kubeconfig for Rancher's `local` cluster (generateKubeconfig),
-- stored on the server (root-only) where later recipes find it, and a check
-- that the Kubernetes API answers through Rancher's proxy.
--
-- vars: cluster ("local"), kubeconfig_path ("/etc/kengine/rancher/kubeconfig"), and rancher.lua's
-- rancher_url / rancher_cacert.
local k = require "kengine"
local mission = require "kengine.mission"

return k.recipe {
  name = "kubernetes",
  hosts = "servers",
  sudo = true,
  vars = { cluster = "local" },
  run = function(h)
    local api = mission.rancher_api(h)
    local path = h.vars.kubeconfig_path or mission.KUBECONFIG
    local r = h:rancher_kubeconfig { url = api.url, cacert = api.cacert, path = path, cluster = h.vars.cluster,
      controller_server = api.url .. "/k8s/clusters/" .. h.vars.cluster }
    if h.check and r.changed then return end
    local kc, err = mission.kube_client(h)
    if not kc then h:fail(err) end
    local v, verr = kc:version()
    kc:close()
    if not v then h:fail("the Kubernetes API does not answer through Rancher: " .. tostring(verr)) end
    h:log("Kubernetes " .. tostring(v.gitVersion) .. " answers at " .. api.url .. "/k8s/clusters/" .. h.vars.cluster)
  end,
}
