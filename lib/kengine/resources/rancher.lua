--- rancher_bootstrap, rancher_setting, rancher_kubeconfig: Rancher's API
-- bootstrap as resources, called from the controller (DESIGN decision 7).
-- The API token lives on the server (root-only file), so a later run from
-- any controller finds it and needs no bootstrap password.
--
-- h:rancher_bootstrap{ url=, cacert=, admin_password= (secret, ≥ 12 chars), bootstrap_password= (secret),
--                      username="admin", token_path="/etc/kengine/rancher/token", wait=180 }
-- h:rancher_setting{ url=, cacert=, token_path=, name=, value= }
-- h:rancher_kubeconfig{ url=, cacert=, token_path=, path="/etc/kengine/rancher/kubeconfig", cluster="local",
--                       controller_server= (the cluster URL as the controller reaches it) }
local recipe = require "kengine.recipe"
local rancher = require "kengine.rancher"
local k8s = require "kengine.k8s"
local secret = require "kengine.secret"
local core = require "kengine.core"

local M = {}

local TOKEN_PATH = "/etc/kengine/rancher/token"

local function client(p, token)
  return rancher.new { url = p.url, cacert = p.cacert, insecure = p.insecure, token = token }
end

local function read_token(h, p)
  local t = h:read(p.token_path or TOKEN_PATH)
  if t and t:match("%S") then return secret.new((t:gsub("%s+$", ""))) end
  return nil
end
M.read_token = read_token

--- wait (bounded) until /ping answers pong
local function wait_ping(c, seconds)
  local deadline = core.now() + (seconds or 180)
  local last
  repeat
    local ok, err = c:ping()
    if ok then return true end
    last = err
    core.sleep(1)
  until core.now() > deadline
  error("Rancher did not answer /ping within " .. (seconds or 180) .. " s: " .. tostring(last), 0)
end

recipe.resource {
  name = "rancher_bootstrap",
  description = "Rancher's admin password set and an API token stored on the server",
  label = function(p) return p.url end,
  validate = function(p)
    if type(p.url) ~= "string" then return false, "url is required" end
    if p.admin_password == nil then return false, "admin_password (a secret) is required" end
    if #secret.reveal(p.admin_password) < 12 then return false, "admin_password must be at least 12 characters" end
    return true
  end,
  probe = function(h, p)
    wait_ping(client(p), p.wait)
    local token = read_token(h, p)
    if not token then return { token = nil } end
    local valid, err = client(p, token):token_valid()
    if valid == nil then error(err, 0) end
    return { token = token, valid = valid }
  end,
  diff = function(_, _, st)
    if st.token and st.valid then return nil end
    return { summary = st.token and "stored API token is no longer valid: log in again"
      or "log in, set the admin password, store an API token" }
  end,
  apply = function(h, p)
    local c = client(p)
    local user = p.username or "admin"
    local session, lerr, _, status = c:login(user, p.admin_password)
    if not session then
      if status ~= 401 then error("Rancher login failed: " .. tostring(lerr), 0) end
      if not p.bootstrap_password then
        error("Rancher rejects the admin password and no bootstrap_password was given", 0)
      end
      -- the admin user may not exist yet right after /ping: retry (bounded)
      local deadline = core.now() + (p.wait or 180)
      repeat
        session, lerr = c:login(user, p.bootstrap_password)
        if session then break end
        core.sleep(1)
      until core.now() > deadline
      if not session then error("Rancher login with the bootstrap password failed: " .. tostring(lerr), 0) end
      c.token = session
      local ok, cerr = c:change_password(p.bootstrap_password, p.admin_password)
      if not ok then error(cerr, 0) end
    end
    c.token = session
    local token, terr = c:create_token { description = "kengine " .. h.name }
    if not token then error(terr, 0) end
    local ok, merr = pcall(h.raw, h, "mkdir -p -m 0700 " .. require("kengine.host").quote(
      (p.token_path or TOKEN_PATH):match("^(.*)/")))
    if not ok then error(merr, 0) end
    h:write(p.token_path or TOKEN_PATH, token .. "\n", { mode = "0600" })
    return { msg = "token " .. rancher.token_name(token) .. " stored" }
  end,
}

local setting = recipe.resource {
  name = "rancher_setting",
  description = "a Rancher setting",
  label = function(p) return p.name end,
  validate = function(p)
    if type(p.name) ~= "string" or p.value == nil then return false, "name and value are required" end
    return true
  end,
  probe = function(h, p)
    local token = read_token(h, p)
    if not token then error("no Rancher API token on the server: run the rancher recipe first", 0) end
    local s, err = client(p, token):setting(p.name)
    if not s then error(err, 0) end
    return { value = s.value, token = token }
  end,
  diff = function(_, p, st)
    if st.value == p.value then return nil end
    return { summary = string.format("%s: %q → %q", p.name, tostring(st.value), tostring(p.value)) }
  end,
  apply = function(_, p, st)
    local ok, err = client(p, st.token):set_setting(p.name, p.value)
    if ok == nil then error(err, 0) end
  end,
}

setting.params_own = { name = true } -- the setting's name, not the step's

--- A Kubernetes client for a kubeconfig, reaching the cluster the way the
-- controller can (controller_server replaces the server URL; the CA stays).
function M.k8s_client(kubeconfig, controller_server, cacert)
  local cfg, err = k8s.parse_kubeconfig(kubeconfig)
  if not cfg then return nil, err end
  if controller_server then cfg.server = controller_server end
  if cacert and not cfg.ca_pem then cfg.ca_file = cacert end
  return k8s.new(cfg)
end

recipe.resource {
  name = "rancher_kubeconfig",
  description = "a kubeconfig for a Rancher cluster, stored on the server",
  label = function(p) return p.path or "/etc/kengine/rancher/kubeconfig" end,
  validate = function(p)
    if type(p.url) ~= "string" then return false, "url is required" end
    return true
  end,
  probe = function(h, p)
    local text = h:read(p.path or "/etc/kengine/rancher/kubeconfig")
    if not text then return { exists = false } end
    local kc = M.k8s_client(secret.new(text), p.controller_server, p.cacert)
    if not kc then return { exists = true, works = false } end
    local v = kc:version()
    kc:close()
    return { exists = true, works = v ~= nil }
  end,
  diff = function(_, _, st)
    if st.exists and st.works then return nil end
    return { summary = st.exists and "stored kubeconfig no longer works: generate a new one"
      or "generate a kubeconfig" }
  end,
  apply = function(h, p)
    local token = read_token(h, p)
    if not token then error("no Rancher API token on the server: run the rancher recipe first", 0) end
    local cfg, err = client(p, token):kubeconfig(p.cluster or "local")
    if not cfg then error(err, 0) end
    local path = p.path or "/etc/kengine/rancher/kubeconfig"
    h:raw("mkdir -p -m 0700 " .. require("kengine.host").quote(path:match("^(.*)/")))
    h:write(path, cfg, { mode = "0600" })
  end,
}

return M
