--- Helpers shared by the mission recipes (recipes/*.lua): where Rancher is,
-- how the controller reaches and trusts it, the Kubernetes client, and the
-- container images the lab builds without a registry.
-- @module kengine.mission
local proc = require "kengine.proc"
local core = require "kengine.core"
local secret = require "kengine.secret"

local M = {}

M.NGINX_CERT = "/etc/nginx/ssl/rancher.crt"   -- the nginx recipe's certificate (self-signed or given)
M.KUBECONFIG = "/etc/kengine/rancher/kubeconfig"

local function tmpdir(tag)
  local d = string.format("%s/kengine-%s-%d-%d", os.getenv("TMPDIR") or "/tmp", tag,
    math.floor(core.now() * 1000) % 1e9, math.random(1e9))
  assert(proc.exec({ "mkdir", "-p", "-m", "0700", d }).code == 0, "cannot create " .. d)
  return d
end

--- The server's public name.
function M.server_name(h)
  local n = h.vars.server_name
  if n == nil or n == "_" then return "localhost" end
  return n
end

--- Rancher's server-url (what the server and kubeconfigs use).
function M.server_url(h)
  return h.vars.server_url or ("https://" .. M.server_name(h))
end

--- How the controller reaches Rancher through the server's nginx, and the CA
-- that verifies it: exactly the server's certificate unless rancher_cacert is given.
-- @return {url =, cacert =}
function M.rancher_api(h)
  if h._rancher_api then return h._rancher_api end
  local v = h.vars
  local url = v.rancher_url
  if not url and v.lab_https_port then url = "https://127.0.0.1:" .. v.lab_https_port end
  url = url or M.server_url(h)
  local cacert = v.rancher_cacert
  if not cacert then
    local pem = h:read(v.tls_cert or M.NGINX_CERT)
    if pem then
      cacert = tmpdir("ca") .. "/ca.pem"
      assert(proc.write_file(cacert, pem, { mode = "0600" }))
    end
  end
  h._rancher_api = { url = url, cacert = cacert }
  return h._rancher_api
end

--- A Kubernetes client for the cluster Rancher manages, as the controller
-- reaches it (Rancher's /k8s/clusters/local proxy behind nginx).
-- @return client or nil, msg
function M.kube_client(h)
  local text = h:read(h.vars.kubeconfig_path or M.KUBECONFIG)
  if not text then return nil, "no kubeconfig on the server: run the kubernetes recipe first" end
  local api = M.rancher_api(h)
  local rres = require "kengine.resources.rancher"
  return rres.k8s_client(secret.new(text), api.url .. "/k8s/clusters/" .. (h.vars.cluster or "local"), api.cacert)
end

--- Build context for an image: the files of recipes/files/NAME plus extras
-- {target_name = controller_path}.  @return the context directory
function M.context(name, extra)
  local dir = tmpdir("ctx-" .. name)
  local src = (os.getenv("KENGINE_RECIPES") or "recipes") .. "/files/" .. name
  local r = proc.exec({ "sh", "-c", 'cp -R "$1"/. "$2"/', "sh", src, dir })
  if r.code ~= 0 then error("cannot copy " .. src .. ": " .. r.stderr, 0) end
  for target, path in pairs(extra or {}) do
    r = proc.exec({ "cp", path, dir .. "/" .. target })
    if r.code ~= 0 then error("cannot copy " .. path .. " into the " .. name .. " image context: " .. r.stderr, 0) end
  end
  -- modes are part of the context (and of its hash): fix them, whatever the umask
  r = proc.exec({ "chmod", "-R", "u=rwX,go=rX", dir })
  if r.code ~= 0 then error("cannot set modes in " .. dir .. ": " .. r.stderr, 0) end
  return dir
end

--- The simulator image (lab only): the lab base image from a tarball, then
-- recipes/files/rancher-sim with tests/sim/rancher_sim.py.
function M.rancher_sim_image(h)
  local v = h.vars
  if not v.rancher_sim_base then
    h:fail("rancher_sim needs rancher_sim_base: a tarball of the lab image (docker save kengine-lab:bookworm)")
  end
  h:docker_image { name = "kengine-lab:bookworm", tarball = v.rancher_sim_base }
  local ctx = M.context("rancher-sim", { ["rancher_sim.py"] = v.rancher_sim_source or "tests/sim/rancher_sim.py" })
  h:docker_image { name = "kengine/rancher-sim:1", context = ctx }
  return "kengine/rancher-sim:1"
end

--- The hello image: FROM scratch with a static busybox from the controller.
function M.hello_image(h)
  local ctx = M.context("hello", { busybox = h.vars.busybox or "/bin/busybox" })
  h:docker_image { name = "kengine/hello:1", context = ctx }
  return "kengine/hello:1"
end

return M
