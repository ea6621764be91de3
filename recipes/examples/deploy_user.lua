--- A deploy user with your SSH key and a sudo rule, using plain Lua for the list.
-- kengine run recipes/examples/deploy_user.lua -i $(kengine lab inventory) -e key="$(cat ~/.ssh/id_ed25519.pub)"
local k = require "kengine"

return k.recipe {
  name = "deploy_user",
  hosts = "all",
  sudo = true,
  vars = { users = { "deploy" }, key = nil },
  run = function(h)
    for _, name in ipairs(h.vars.users) do
      h:user { name = name, shell = "/bin/bash", authorized_keys = h.vars.key and { h.vars.key } or {} }
      h:file { path = "/etc/sudoers.d/90-" .. name, content = name .. " ALL=(ALL) NOPASSWD:ALL\n", mode = "0440" }
    end
  end,
}
