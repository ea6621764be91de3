--- template: a file rendered from a template (see kengine.template).
-- h:template{ path=, src= (local file) or template= (text), vars= (default: the host's vars),
--             mode=, owner=, group= }
-- Rendering happens on the controller; the result is converged like `file`.
local recipe = require "kengine.recipe"
local template = require "kengine.template"

local function render(h, p)
  if p._rendered then return p._rendered end
  local text, name = p.template, "template"
  if p.src then
    local f, err = io.open(p.src, "r")
    if not f then error("template: " .. err, 0) end
    text = f:read("a")
    f:close()
    name = p.src
  end
  local vars = p.vars or h.vars
  local out, err = template.render(text, vars, name)
  if not out then error(err, 0) end
  p._rendered = out
  return out
end

return recipe.resource {
  name = "template",
  description = "a file rendered from a template",
  label = function(p) return p.path end,
  validate = function(p)
    if type(p.path) ~= "string" or p.path:sub(1, 1) ~= "/" then return false, "path must be an absolute path" end
    if (p.src == nil) == (p.template == nil) then return false, "give either src (a file) or template (text)" end
    return true
  end,
  probe = function(h, p)
    p.content = render(h, p)
    p.state = "present"
    return recipe.resources.file.probe(h, p)
  end,
  diff = function(h, p, st) return recipe.resources.file.diff(h, p, st) end,
  apply = function(h, p, st, ch) return recipe.resources.file.apply(h, p, st, ch) end,
}
