--- A message of the day, and a log line when it changes.
-- kengine run recipes/examples/motd.lua -i $(kengine lab inventory) [--check] [--diff]
local k = require "kengine"

return k.recipe {
  name = "motd",
  hosts = "all",
  vars = { message = "managed by kengine" },
  handlers = {
    ["log motd"] = function(h) h:exec("logger -t kengine 'motd changed' || true") end,
  },
  run = function(h)
    h:file {
      path = "/etc/motd",
      content = h.vars.message .. " on " .. h.name .. "\n",
      mode = "0644",
      notify = "log motd",
    }
  end,
}
