--- The built-in resources: requiring this declares them all.
-- @module kengine.resources
local M = {}
for _, name in ipairs({ "file", "line", "template" }) do
  M[name] = require("kengine.resources." .. name)
end
return M
