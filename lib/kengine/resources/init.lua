--- The built-in resources: requiring this declares them all.
-- @module kengine.resources
local M = {}

M.NAMES = { "file", "line", "template", "package", "apt_repository", "service", "download", "wait_for",
  "command", "user", "sshd", "docker", "nginx", "rancher", "k8s" }

for _, name in ipairs(M.NAMES) do
  local modname = "kengine.resources." .. name
  if package.searchpath(modname, package.path) then M[name] = require(modname) end
end

return M
