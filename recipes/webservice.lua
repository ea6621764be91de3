--- webservice: the demo web service — a page showing the hostname of the
-- replica that served it — deployed with N replicas, exposed, and scaled by
-- changing N and re-running.
--
-- backend = "kubernetes" (default): through the Kubernetes API from the
--   controller (the kubeconfig the kubernetes recipe stored): a Deployment with
--   `replicas`, a Service exposing it, the rollout waited for with kubectl's
--   rule, pods listed.  Changing `replicas` scales through the scale
--   subresource; an unchanged spec is zero changes; state = "absent" removes it.
-- backend = "docker": N containers on the server behind an nginx upstream
--   (what runs for real in the lab): requests through nginx reach the replicas
--   in turn.
--
-- vars:
--   app            name of the Deployment/Service/containers     ("hello")
--   replicas       N                                              (3)
--   image          container image                                ("kengine/hello:1"; built locally for docker)
--   container_port port the image listens on                      (8080)
--   service_type   "NodePort" | "LoadBalancer" | "ClusterIP"      ("NodePort")
--   namespace      Kubernetes namespace                           ("default")
--   state          "present" | "absent"                           ("present")
--   backend        "kubernetes" | "docker"                        ("kubernetes")
--   hello_port     nginx port for the docker backend              (80)
--   replica_base_port  replicas listen on 127.0.0.1:base+i        (18080)
local k = require "kengine"
local mission = require "kengine.mission"

local function manifests(v)
  local labels = { app = v.app }
  local deployment = {
    apiVersion = "apps/v1", kind = "Deployment",
    metadata = { name = v.app, labels = labels },
    spec = {
      replicas = v.replicas,
      selector = { matchLabels = labels },
      template = {
        metadata = { labels = labels },
        spec = { containers = { { name = v.app, image = v.image, ports = { { containerPort = v.container_port } } } } },
      },
    },
  }
  local service = {
    apiVersion = "v1", kind = "Service",
    metadata = { name = v.app, labels = labels },
    spec = { type = v.service_type, selector = labels,
      ports = { { port = 80, targetPort = v.container_port, protocol = "TCP" } } },
  }
  return deployment, service
end

local function kubernetes(h)
  local v = h.vars
  local kc, err = mission.kube_client(h)
  if not kc then
    if h.check then h:log("no kubeconfig yet: " .. v.app .. " would be deployed after the kubernetes recipe") return end
    h:fail(err)
  end
  local deployment, service = manifests(v)
  if v.state == "absent" then
    h:k8s_object { client = kc, kind = "services", manifest = service, namespace = v.namespace, state = "absent" }
    h:k8s_object { client = kc, kind = "deployments", manifest = deployment, namespace = v.namespace, state = "absent" }
    kc:close()
    return
  end
  -- replicas are left to the scale subresource, so scaling never rewrites the spec
  local d = h:k8s_object { client = kc, kind = "deployments", manifest = deployment, namespace = v.namespace,
    ignore = { "replicas" } }
  h:k8s_scale { client = kc, name = v.app, replicas = v.replicas, namespace = v.namespace }
  h:k8s_object { client = kc, kind = "services", manifest = service, namespace = v.namespace }
  if not (h.check and d.changed) then
    h:k8s_rollout { client = kc, name = v.app, namespace = v.namespace, timeout = v.rollout_timeout or 300 }
    local pods = kc:pods("app=" .. v.app, v.namespace) or {}
    local names = {}
    for _, p in ipairs(pods) do names[#names + 1] = p.metadata.name end
    table.sort(names)
    h:log(string.format("%s: %d replica(s): %s", v.app, #names, table.concat(names, " ")))
  end
  kc:close()
end

local function docker(h)
  local v = h.vars
  local image = v.image
  if image == "kengine/hello:1" then image = mission.hello_image(h) end
  local upstream = {}
  local want = v.state == "absent" and 0 or v.replicas
  for i = 1, want do
    local port = v.replica_base_port + i
    upstream[#upstream + 1] = "127.0.0.1:" .. port
    h:docker_container { name = v.app .. "-" .. i, image = image, restart = "unless-stopped",
      ports = { "127.0.0.1:" .. port .. ":" .. v.container_port }, labels = { ["kengine.app"] = v.app } }
  end
  -- replicas above N, from an earlier, larger run
  local r = h:exec("docker ps -a --filter label=kengine.app=" .. v.app .. " --format '{{.Names}}'",
    { check_safe = true, changed_when = false,
      failed_when = function(res) return res.code ~= 0 and not h.check end }) -- check mode: docker may not be there yet
  for name in (r.stdout or ""):gmatch("[^\n]+") do
    local i = tonumber(name:match("%-(%d+)$"))
    if i and i > want then h:docker_container { name = name, state = "absent" } end
  end
  if want == 0 then
    h:nginx_site { name = v.app, state = "absent" }
    return
  end
  h:nginx_site { name = v.app, listen = v.hello_port, server_name = "_", upstream = upstream, default = true }
end

return k.recipe {
  name = "webservice",
  hosts = "servers",
  sudo = true,
  vars = { app = "hello", replicas = 3, image = "kengine/hello:1", container_port = 8080, service_type = "NodePort",
    namespace = "default", state = "present", backend = "kubernetes", hello_port = 80, replica_base_port = 18080 },
  run = function(h)
    if math.type(h.vars.replicas) ~= "integer" or h.vars.replicas < 0 then
      h:fail("replicas must be a non-negative integer, got " .. tostring(h.vars.replicas))
    end
    if h.vars.backend == "docker" then docker(h) else kubernetes(h) end
  end,
}
