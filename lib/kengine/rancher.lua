--- Rancher v2 API client: the bootstrap calls kengine needs.
-- Follows shared/reference/rancher-kubernetes-api.md §2: login through
-- /v1-public/login with a fallback to /v3-public (both response shapes),
-- password change, settings, API tokens, generateKubeconfig.  Every call
-- returns its result or nil, message, code; messages name the method, the
-- path and Rancher's own code and message, whichever of the three error body
-- shapes it used.
-- @module kengine.rancher
local http = require "kengine.http"
local json = require "kengine.json"
local secret = require "kengine.secret"

local M = {}
local Client = {}
Client.__index = Client

--- New client.
-- @param opts {url = "https://rancher.example", token = "name:key" (or a secret), cacert =, insecure =, timeout =}
function M.new(opts)
  assert(type(opts) == "table" and type(opts.url) == "string", "rancher.new: url expected")
  return setmetatable({ url = opts.url:gsub("/+$", ""), token = opts.token, cacert = opts.cacert,
    insecure = opts.insecure, timeout = opts.timeout or 30 }, Client)
end

--- Turn any of Rancher's error bodies into "status Code: message".
-- norman: {"type":"error","status":404,"code":"NotFound","message":...}
-- v2.13 auth: {"code":"Unauthorized","status":401,"message":"authentication failed",...}
-- no credentials: {"type":"error","status":"401","message":"must authenticate"}
function M.error_text(res)
  local body = json.decode(res.body or "")
  if type(body) == "table" and (body.type == "error" or body.code or body.message) then
    local status = tonumber(body.status) or res.status
    local code = body.code or (status == 401 and "Unauthorized") or "Error"
    local text = string.format("%d %s: %s", status, code, tostring(body.message or ""))
    if body.fieldName then text = text .. " (field " .. body.fieldName .. ")" end
    return text, code
  end
  local snippet = (res.body or ""):sub(1, 200):gsub("%s+", " ")
  return string.format("%d %s", res.status, snippet), "HTTP" .. res.status
end

function Client:call(method, path, body, opts)
  opts = opts or {}
  local headers = { Accept = "application/json" }
  if self.token and not opts.anonymous then
    headers.Authorization = "Bearer " .. secret.reveal(self.token)
  end
  local res, err, code = http.request { method = method, url = self.url .. path, headers = headers,
    json = body, timeout = opts.timeout or self.timeout, cacert = self.cacert, insecure = self.insecure }
  if not res then return nil, err, code end
  if res.status >= 400 and not (opts.accept and opts.accept[res.status]) then
    local text, rcode = M.error_text(res)
    return nil, string.format("Rancher %s %s: %s", method, path, text), rcode, res.status
  end
  return res
end

local function decode(res, what)
  local v, err = res:json()
  if type(v) ~= "table" then return nil, what .. ": " .. tostring(err), "EPROTO" end
  return v
end

--- GET /ping → true when Rancher answers "pong".
function Client:ping()
  local res, err, code = http.get(self.url .. "/ping", { cacert = self.cacert, insecure = self.insecure,
    timeout = 10 })
  if not res then return nil, err, code end
  if res.status == 200 and res.body:match("^%s*pong") then return true end
  return nil, "Rancher /ping: " .. res.status .. " " .. res.body:sub(1, 80), "ENOTREADY"
end

--- The name (id) of a "name:key" token, without an "ext/" prefix, as
-- terraform-provider-rancher2 strips it.  The bearer value keeps the prefix:
-- an ext token authenticates only with it.
function M.token_name(token)
  local name = tostring(secret.reveal(token)):match("^([^:]+)") or ""
  if name:sub(1, 4) == "ext/" then name = name:sub(5) end
  return name
end

--- Log in as a local user.  Tries /v1-public/login (v2.13+), falls back to
-- /v3-public/localProviders/local?action=login on 404.  Both response shapes
-- (short v2.13+ object, full token resource before) carry `token`.
-- @return token (a secret "name:key"), token name; or nil, msg, code
function Client:login(username, password, opts)
  opts = opts or {}
  local pw = secret.reveal(password)
  local body = { type = "localProvider", username = username, password = pw,
    description = opts.description or "kengine", ttl = opts.ttl or 57600000, responseType = "json" }
  local res, err, code, status = self:call("POST", "/v1-public/login", body, { anonymous = true, accept = { [404] = true } })
  if res and res.status == 404 then
    body.type = nil
    res, err, code, status = self:call("POST", "/v3-public/localProviders/local?action=login", body, { anonymous = true })
  end
  if not res then return nil, err, code, status end
  local v, derr = decode(res, "Rancher login")
  if not v then return nil, derr, "EPROTO" end
  if type(v.token) ~= "string" then return nil, "Rancher login: response has no token", "EPROTO" end
  return secret.new(v.token), M.token_name(v.token)
end

--- Change the current user's password (200, empty body on success).
function Client:change_password(current, new)
  local res, err, code, status = self:call("POST", "/v3/users?action=changepassword",
    { currentPassword = secret.reveal(current), newPassword = secret.reveal(new) })
  if not res then return nil, err, code, status end
  return true
end

--- GET a setting; @return the setting resource
function Client:setting(name)
  local res, err, code, status = self:call("GET", "/v3/settings/" .. name)
  if not res then return nil, err, code, status end
  return decode(res, "Rancher setting " .. name)
end

--- Set a setting when it differs. @return changed (boolean) or nil, msg, code
function Client:set_setting(name, value)
  local cur, err, code, status = self:setting(name)
  if not cur then return nil, err, code, status end
  if cur.value == value then return false end
  local res
  res, err, code, status = self:call("PUT", "/v3/settings/" .. name, { name = name, value = value })
  if not res then return nil, err, code, status end
  return true
end

--- Is the client's token valid?  (GET /v3/users?me=true)
function Client:token_valid()
  if not self.token then return false end
  local res, _, _, status = self:call("GET", "/v3/users?me=true")
  if res then return true end
  if status == 401 or status == 403 then return false end
  return nil, "cannot check the Rancher token", "EPROTO"
end

--- Create an API token. @return token (a secret) or nil, msg, code
function Client:create_token(opts)
  opts = opts or {}
  local res, err, code, status = self:call("POST", "/v3/tokens",
    { type = "token", description = opts.description or "kengine automation", ttl = opts.ttl or 0 })
  if not res then return nil, err, code, status end
  local v, derr = decode(res, "Rancher token")
  if not v then return nil, derr, "EPROTO" end
  return secret.new(v.token), M.token_name(v.token)
end

--- generateKubeconfig for a cluster ("local" by default). @return YAML text (a secret: it holds a token)
function Client:kubeconfig(cluster)
  cluster = cluster or "local"
  local res, err, code, status = self:call("POST", "/v3/clusters/" .. cluster .. "?action=generateKubeconfig")
  if not res then return nil, err, code, status end
  local v, derr = decode(res, "Rancher generateKubeconfig")
  if not v then return nil, derr, "EPROTO" end
  if type(v.config) ~= "string" then return nil, "Rancher generateKubeconfig: no config in the response", "EPROTO" end
  return secret.new(v.config)
end

M.Client = Client
return M
