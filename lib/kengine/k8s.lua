--- Kubernetes API client: kubeconfig, Deployments, Services, scale, pods, rollout.
-- Follows shared/reference/rancher-kubernetes-api.md §3.  The kubeconfig is
-- read with a real YAML parser (lyaml), so Rancher's wrapped
-- certificate-authority-data line parses.  API errors become messages like
-- `deployments.apps "hello" already exists (409 AlreadyExists)`.
-- @module kengine.k8s
local http = require "kengine.http"
local json = require "kengine.json"
local secret = require "kengine.secret"
local core = require "kengine.core"
local proc = require "kengine.proc"

local M = {}
local Client = {}
Client.__index = Client

local b64decode = require("kengine.base64").decode

local function find_named(list, name)
  for _, item in ipairs(list or {}) do
    if item.name == name then return item end
  end
end

-- a private file for PEM data curl needs as a path
local function temp_pem(data)
  local dir = os.getenv("XDG_RUNTIME_DIR") or os.getenv("TMPDIR") or "/tmp"
  local path = string.format("%s/kengine-%d-%d.pem", dir, math.floor(core.now() * 1e6) % 1e9, math.random(1e9))
  assert(proc.write_file(path, data, { mode = "0600" }))
  return path
end

--- Parse a kubeconfig (YAML text or a secret holding it).
-- @return {server=, token=, ca_pem=, cert_pem=, key_pem=, insecure=, namespace=, context=} or nil, msg, code
function M.parse_kubeconfig(text, context_name)
  local ok, lyaml = pcall(require, "lyaml")
  if not ok then return nil, "kubeconfig: the lyaml module (Debian lua-yaml) is required", "ENOENT" end
  local pok, doc = pcall(lyaml.load, secret.reveal(text))
  if not pok or type(doc) ~= "table" then
    return nil, "kubeconfig: invalid YAML: " .. tostring(doc):gsub("\n.*", ""), "EPROTO"
  end
  context_name = context_name or doc["current-context"]
  local ctx = find_named(doc.contexts, context_name)
  if not ctx then return nil, "kubeconfig: no context '" .. tostring(context_name) .. "'", "EPROTO" end
  local cluster = find_named(doc.clusters, ctx.context and ctx.context.cluster)
  local user = find_named(doc.users, ctx.context and ctx.context.user)
  if not cluster or not cluster.cluster or not cluster.cluster.server then
    return nil, "kubeconfig: context '" .. context_name .. "' has no cluster server", "EPROTO"
  end
  local c, u = cluster.cluster, user and user.user or {}
  local cfg = { server = c.server:gsub("/+$", ""), context = context_name,
    namespace = ctx.context.namespace or "default", insecure = c["insecure-skip-tls-verify"] == true }
  if c["certificate-authority-data"] then
    cfg.ca_pem = b64decode(c["certificate-authority-data"])
    if not cfg.ca_pem or not cfg.ca_pem:match("BEGIN CERTIFICATE") then
      return nil, "kubeconfig: certificate-authority-data is not a base64 PEM certificate", "EPROTO"
    end
  elseif c["certificate-authority"] then
    cfg.ca_file = c["certificate-authority"]
  end
  if u.token then cfg.token = secret.new(u.token) end
  if u["client-certificate-data"] then cfg.cert_pem = b64decode(u["client-certificate-data"]) end
  if u["client-key-data"] then cfg.key_pem = secret.new(b64decode(u["client-key-data"])) end
  if u["client-certificate"] then cfg.cert_file = u["client-certificate"] end
  if u["client-key"] then cfg.key_file = u["client-key"] end
  return cfg
end

--- A client from a kubeconfig (text, secret, or parsed table).
-- @return client or nil, msg, code
function M.new(kubeconfig, opts)
  opts = opts or {}
  local cfg = kubeconfig
  if type(kubeconfig) ~= "table" or secret.is(kubeconfig) then
    local err, code
    cfg, err, code = M.parse_kubeconfig(kubeconfig, opts.context)
    if not cfg then return nil, err, code end
  end
  local self = setmetatable({ cfg = cfg, server = cfg.server, namespace = cfg.namespace or "default",
    timeout = opts.timeout or 30, token = cfg.token }, Client)
  self.cacert = cfg.ca_file or (cfg.ca_pem and temp_pem(cfg.ca_pem))
  self.client_cert = cfg.cert_file or (cfg.cert_pem and temp_pem(cfg.cert_pem))
  self.client_key = cfg.key_file or (cfg.key_pem and temp_pem(secret.reveal(cfg.key_pem)))
  self.insecure = cfg.insecure or opts.insecure
  return self
end

--- Remove the temporary PEM files the client wrote.
function Client:close()
  for _, key in ipairs({ "cacert", "client_cert", "client_key" }) do
    local f = self[key]
    if f and f:match("/kengine%-%d+%-%d+%.pem$") then os.remove(f) end
    self[key] = nil
  end
end

--- Format a Kubernetes Status error: `deployments.apps "hello" already exists (409 AlreadyExists)`.
function M.error_text(res)
  local body = json.decode(res.body or "")
  if type(body) == "table" and body.kind == "Status" then
    return string.format("%s (%d %s)", tostring(body.message or ""), tonumber(body.code) or res.status,
      tostring(body.reason or "")), body.reason or ("HTTP" .. res.status)
  end
  if res.status == 401 then return "401 Unauthorized", "Unauthorized" end
  return string.format("%d %s", res.status, (res.body or ""):sub(1, 200):gsub("%s+", " ")), "HTTP" .. res.status
end

--- One API call.  @return decoded body (or true), status; or nil, msg, reason, status
function Client:request(method, path, body, opts)
  opts = opts or {}
  local headers = { Accept = "application/json" }
  if self.token then headers.Authorization = "Bearer " .. secret.reveal(self.token) end
  local req = { method = method, url = self.server .. path, headers = headers, timeout = opts.timeout or self.timeout,
    cacert = self.cacert, insecure = self.insecure, client_cert = self.client_cert, client_key = self.client_key }
  if body ~= nil then
    req.body = type(body) == "string" and body or json.encode(body)
    headers["Content-Type"] = opts.content_type or "application/json"
  end
  local res, err, code = http.request(req)
  if not res then return nil, err, code end
  if res.status >= 400 then
    local text, reason = M.error_text(res)
    return nil, text, reason, res.status
  end
  if res.body == "" then return true, res.status end
  local v, derr = res:json()
  if v == nil then return nil, method .. " " .. path .. ": " .. tostring(derr), "EPROTO", res.status end
  return v, res.status
end

local function q(s) return (tostring(s):gsub("[^%w%-%._~]", function(c) return string.format("%%%02X", c:byte()) end)) end

local PATHS = {
  deployments = function(ns) return "/apis/apps/v1/namespaces/" .. q(ns) .. "/deployments" end,
  services = function(ns) return "/api/v1/namespaces/" .. q(ns) .. "/services" end,
  pods = function(ns) return "/api/v1/namespaces/" .. q(ns) .. "/pods" end,
}

function Client:path(kind, ns, name)
  local p = assert(PATHS[kind], "unknown kind " .. tostring(kind))(ns or self.namespace)
  if name then p = p .. "/" .. q(name) end
  return p
end

function Client:get(kind, name, ns) return self:request("GET", self:path(kind, ns, name)) end
function Client:list(kind, ns, selector)
  local p = self:path(kind, ns)
  if selector then p = p .. "?labelSelector=" .. q(selector) end
  return self:request("GET", p)
end
function Client:create(kind, obj, ns) return self:request("POST", self:path(kind, ns), obj) end
function Client:replace(kind, obj, ns) return self:request("PUT", self:path(kind, ns, obj.metadata.name), obj) end
function Client:patch(kind, name, patch, ns, content_type)
  return self:request("PATCH", self:path(kind, ns, name), patch,
    { content_type = content_type or "application/merge-patch+json" })
end
function Client:delete(kind, name, ns, propagation)
  return self:request("DELETE", self:path(kind, ns, name) .. "?propagationPolicy=" .. (propagation or "Background"))
end

--- GET /version (through Rancher's proxy this proves the cluster answers)
function Client:version() return self:request("GET", "/version") end

--- Is every field of want present with the same value in have?  (arrays compared elementwise)
local function subset(want, have)
  if type(want) ~= "table" then return want == have end
  if type(have) ~= "table" then return false end
  for key, v in pairs(want) do
    if not subset(v, have[key]) then return false end
  end
  return true
end
M.subset = subset

--- Create the object, or replace it when the desired fields differ from the
-- live ones.  `ignore` lists top-level spec keys left to other calls
-- (e.g. "replicas", scaled through the scale subresource).
-- @return "created" | "updated" | "unchanged", live object; or nil, msg, reason
function Client:apply(kind, obj, ns, ignore)
  local live, err, reason, status = self:get(kind, obj.metadata.name, ns)
  if not live then
    if status ~= 404 then return nil, err, reason, status end
    local created
    created, err, reason, status = self:create(kind, obj, ns)
    if not created then return nil, err, reason, status end
    return "created", created
  end
  local want = json.decode(json.encode(obj)) -- a copy without shared tables
  for _, key in ipairs(ignore or {}) do if want.spec then want.spec[key] = nil end end
  if subset(want.spec, live.spec) and subset(want.metadata.labels or {}, live.metadata.labels or {}) then
    return "unchanged", live
  end
  -- keep what the server owns: resourceVersion for optimistic concurrency, and ignored spec keys
  want.metadata.resourceVersion = live.metadata.resourceVersion
  for _, key in ipairs(ignore or {}) do want.spec[key] = live.spec[key] end
  if kind == "services" then
    want.spec.clusterIP = live.spec.clusterIP
    want.spec.clusterIPs = live.spec.clusterIPs
    for i, port in ipairs(want.spec.ports or {}) do
      local lp = live.spec.ports and live.spec.ports[i]
      if lp and port.nodePort == nil then port.nodePort = lp.nodePort end
    end
  end
  local updated
  updated, err, reason, status = self:replace(kind, want, ns)
  if not updated then return nil, err, reason, status end
  return "updated", updated
end

--- The scale subresource.  @return Scale or nil, msg, reason
function Client:get_scale(name, ns)
  return self:request("GET", self:path("deployments", ns, name) .. "/scale")
end

--- Scale a Deployment with a merge patch on /scale.
function Client:scale(name, replicas, ns)
  return self:request("PATCH", self:path("deployments", ns, name) .. "/scale", { spec = { replicas = replicas } },
    { content_type = "application/merge-patch+json" })
end

--- kubectl's rollout rule on a Deployment object.
-- @return done (boolean), message
function M.rollout_status(d)
  local st, spec = d.status or {}, d.spec or {}
  local gen, observed = d.metadata.generation or 0, st.observedGeneration or 0
  if gen > observed then return false, "waiting for the deployment spec update to be observed" end
  for _, c in ipairs(st.conditions or {}) do
    if c.type == "Progressing" and c.reason == "ProgressDeadlineExceeded" then
      error("deployment " .. d.metadata.name .. " exceeded its progress deadline", 0)
    end
  end
  local want = spec.replicas or 1
  local updated, replicas, available = st.updatedReplicas or 0, st.replicas or 0, st.availableReplicas or 0
  if updated < want then
    return false, string.format("%d of %d updated replicas are available", updated, want)
  end
  if replicas > updated then
    return false, string.format("%d old replicas are pending termination", replicas - updated)
  end
  if available < updated then
    return false, string.format("%d of %d updated replicas are available", available, updated)
  end
  return true, "successfully rolled out"
end

--- Wait until a Deployment has rolled out (kubectl's rule), with a deadline.
-- @return the Deployment or nil, msg, code
function Client:rollout_wait(name, ns, timeout, interval)
  local deadline = core.now() + (timeout or 300)
  local last = "not checked"
  while core.now() < deadline do
    local d, err, reason = self:get("deployments", name, ns)
    if not d then return nil, err, reason end
    local ok, done, msg = pcall(M.rollout_status, d)
    if not ok then return nil, done, "ProgressDeadlineExceeded" end
    if done then return d end
    last = msg
    core.sleep(interval or 0.5)
  end
  return nil, string.format("rollout of %s timed out after %ds: %s", name, timeout or 300, last), "ETIMEDOUT"
end

--- Pods by label selector. @return list of pods or nil, msg, reason
function Client:pods(selector, ns)
  local list, err, reason = self:list("pods", ns, selector)
  if not list then return nil, err, reason end
  return list.items or {}
end

M.Client = Client
return M
