--- k8s_object, k8s_scale and h:k8s_rollout: Kubernetes objects through the
-- API from the controller (kengine.k8s).  `client` is a kengine.k8s client.
--
-- h:k8s_object{ client=, kind="deployments"|"services", manifest={...}, namespace=, state="present"|"absent",
--               ignore={"replicas"} (spec keys left to other calls) }
-- h:k8s_scale{ client=, name=, replicas=, namespace= }
-- h:k8s_rollout{ client=, name=, namespace=, timeout=300 }   (waits; read-only, also in check mode)
local recipe = require "kengine.recipe"
local k8s = require "kengine.k8s"
local json = require "kengine.json"
local Host = require("kengine.host").Host

recipe.resource {
  name = "k8s_object",
  description = "a Kubernetes object, created or replaced when its spec differs",
  defaults = { state = "present" },
  label = function(p) return (p.kind or "?") .. "/" .. tostring(p.manifest and p.manifest.metadata.name) end,
  validate = function(p)
    if not p.client then return false, "client (a kengine.k8s client) is required" end
    if type(p.kind) ~= "string" then return false, "kind is required" end
    if type(p.manifest) ~= "table" or type(p.manifest.metadata) ~= "table" then return false, "manifest is required" end
    return true
  end,
  probe = function(_, p)
    local live, err, reason, status = p.client:get(p.kind, p.manifest.metadata.name, p.namespace)
    if not live and status ~= 404 then error(err, 0) end
    return { live = live, reason = reason }
  end,
  diff = function(_, p, st)
    if p.state == "absent" then
      if st.live then return { summary = "delete" } end
      return nil
    end
    if not st.live then return { summary = "create", before = "", after = json.encode(p.manifest) } end
    local want = json.decode(json.encode(p.manifest))
    for _, key in ipairs(p.ignore or {}) do want.spec[key] = nil end
    if k8s.subset(want.spec, st.live.spec) and k8s.subset(want.metadata.labels or {}, st.live.metadata.labels or {}) then
      return nil
    end
    return { summary = "update spec" }
  end,
  apply = function(_, p)
    if p.state == "absent" then
      local ok, err = p.client:delete(p.kind, p.manifest.metadata.name, p.namespace)
      if not ok then error(err, 0) end
      return
    end
    local st, err = p.client:apply(p.kind, p.manifest, p.namespace, p.ignore)
    if not st then error(err, 0) end
    return { msg = st }
  end,
}

local scale = recipe.resource {
  name = "k8s_scale",
  description = "a Deployment's replicas, through the scale subresource",
  label = function(p) return "deployments/" .. tostring(p.name) end,
  validate = function(p)
    if not p.client or type(p.name) ~= "string" or math.type(p.replicas) ~= "integer" then
      return false, "client, name and an integer replicas are required"
    end
    return true
  end,
  probe = function(_, p)
    local s, err, _, status = p.client:get_scale(p.name, p.namespace)
    if not s and status ~= 404 then error(err, 0) end
    return { replicas = s and s.spec.replicas, missing = s == nil }
  end,
  diff = function(_, p, st)
    if st.replicas == p.replicas then return nil end
    return { summary = string.format("scale %s → %d", st.missing and "(new)" or tostring(st.replicas), p.replicas),
      fields = { replicas = { st.replicas, p.replicas } } }
  end,
  apply = function(_, p)
    local s, err = p.client:scale(p.name, p.replicas, p.namespace)
    if not s then error(err, 0) end
  end,
}

scale.params_own = { name = true } -- the Deployment's name, not the step's

--- Wait for a Deployment's rollout (kubectl's rule).  Never "changed".
function Host:k8s_rollout(p)
  local opts = { name = p.step_name, tags = p.tags }
  return self:step("k8s_rollout", "deployments/" .. p.name, opts, function(h)
    if h.check then
      local d = p.client:get("deployments", p.name, p.namespace)
      if not d then return { changed = false, skipped = true, msg = "not created yet (check mode)" } end
    end
    local d, err = p.client:rollout_wait(p.name, p.namespace, p.timeout or 300)
    if not d then return { failed = true, msg = err } end
    local st = d.status or {}
    return { changed = false, deployment = d,
      msg = string.format("%d/%d replicas available", st.availableReplicas or 0, d.spec.replicas or 0) }
  end)
end

return {}
