--- A few tools on every host, checked in one round trip, and a line in a config file.
-- kengine run recipes/examples/tools.lua -i $(kengine lab inventory) -e tools='["jq","tree"]'
local k = require "kengine"

return k.recipe {
  name = "tools",
  hosts = "all",
  sudo = true,
  vars = { tools = { "jq", "tree" } },
  run = function(h)
    h:package { name = h.vars.tools, update_cache = true, cache_valid_time = 3600 }
    h:line { path = "/etc/environment", line = "EDITOR=vi", regexp = "^EDITOR=", create = true }
    if not h.check then -- in check mode jq may not be installed yet
      local r = h:exec("jq --version", { changed_when = false })
      h:log("jq: " .. r.stdout:gsub("%s+$", ""))
    end
  end,
}
