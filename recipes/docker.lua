--- docker: the Docker engine installed and running, admin users in the docker group.
--
-- vars:
--   admin_users            as in base.lua; each is added to the docker group   ({})
--   docker_storage_driver  e.g. "vfs" inside a lab host (nil: Docker's default) (nil)
local k = require "kengine"

return k.recipe {
  name = "docker",
  hosts = "servers",
  sudo = true,
  vars = { admin_users = {}, docker_storage_driver = nil },
  run = function(h)
    h:docker { storage_driver = h.vars.docker_storage_driver }
    for _, u in ipairs(h.vars.admin_users) do
      h:user { name = u.name, groups = { "docker" }, append = true }
    end
  end,
}
