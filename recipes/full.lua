--- full: the whole setup on the inventory's servers, in order — base, Docker,
-- nginx, Rancher, Kubernetes access, kubectl, and the demo web service (on
-- Kubernetes, plus the Docker backend when webservice_docker = true).
-- Each part is also a recipe of its own; their vars apply here.
local k = require "kengine"

local base = k.include "base.lua"
local docker = k.include "docker.lua"
local nginx = k.include "nginx.lua"
local rancher = k.include "rancher.lua"
local kubernetes = k.include "kubernetes.lua"
local kubectl = k.include "kubectl.lua"
local webservice = k.include "webservice.lua"

return k.recipe {
  name = "full",
  hosts = "servers",
  sudo = true,
  vars = { webservice_docker = false },
  run = function(h)
    h:include(base)
    h:include(docker)
    h:include(nginx)
    h:include(rancher)
    h:include(kubernetes)
    h:include(kubectl)
    h:include(webservice)
    if h.vars.webservice_docker then
      h.vars.backend = "docker"
      h:include(webservice)
      h.vars.backend = "kubernetes"
    end
  end,
}
