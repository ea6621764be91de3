--- The command line: `kengine COMMAND [ARGS…]`.
-- Exit status: 0 success, 1 a failure while running, 2 a usage error.
-- @module kengine.cli
local k = require "kengine"

local M = {}

local USAGE = [[
usage: kengine COMMAND [ARGS...]

commands:
  run FILE [ARGS...]   run a Lua file (ARGS in the global `arg`)
  repl                 interactive Lua with kengine loaded as `k`
  version              versions of kengine and the libraries it embeds
  help [COMMAND]       this text, or help on one command

`kengine COMMAND --help` describes each command.
]]

local HELP = {
  run = [[
usage: kengine run FILE [OPTIONS] [ARGS...]

Runs FILE as Lua with `require "kengine"` available; ARGS go to the global
`arg` (arg[0] is FILE). The file runs as a task: SSH, HTTP, local commands and
sleeps inside it yield to one event loop, and tasks it spawns run concurrently.
Reading an undefined global is an error (typos fail at once).

When FILE returns a recipe (k.recipe{...}), it is converged on the hosts of
the inventory, all at once, one SSH connection per host:

  -i, --inventory FILE   inventory: kengine Lua form, Ansible INI or YAML
                         (default: $KENGINE_INVENTORY)
  -l, --limit PATTERN    only hosts matching PATTERN (web*, a group, !name, a:b)
  -C, --check            probe and report what would change; change nothing
  -D, --diff             show unified diffs of file changes
  -e, --extra-vars X     key=value, a JSON object, or @file.json (repeatable;
                         highest precedence)
  -f, --forks N          at most N hosts at once (default 200)
  -t, --tags T           only steps tagged T (comma-separated)
      --skip-tags T      skip steps tagged T
      --fail-fast        stop every host when one fails
  -v, --verbose          show commands and their output
      --json FILE|-      one JSON event per line (with -, human output goes to stderr)

Exit status: 0 every host converged (or the script finished); 1 a host failed
or was unreachable, or the script raised an error (`file:line: message` and
a traceback); 2 a usage error, a syntax error, or a recipe that fails to load.
]],
  repl = [[
usage: kengine repl

Interactive Lua: line editing, history in ~/.kengine_history (KENGINE_HISTORY
overrides), multi-line input (an incomplete chunk continues on the next line),
results printed with tables pretty-printed. `k` is the kengine module.
]],
  version = [[
usage: kengine version

Prints the versions of kengine, Lua, libssh, libcurl and lua-cjson.
]],
  help = [[
usage: kengine help [COMMAND]
]],
}

local function usage_error(msg)
  io.stderr:write("kengine: ", msg, "\n", "Try 'kengine help'.\n")
  return 2
end

local function wants_help(args)
  for _, a in ipairs(args) do
    if a == "--" then return false end
    if a == "--help" or a == "-h" then return true end
  end
  return false
end

local RUN_FLAGS = { ["--check"] = "check", ["-C"] = "check", ["--diff"] = "diff", ["-D"] = "diff",
  ["-v"] = "verbose", ["--verbose"] = "verbose", ["--fail-fast"] = "fail_fast" }
local RUN_VALUES = { ["-i"] = "inventory", ["--inventory"] = "inventory", ["-l"] = "limit", ["--limit"] = "limit",
  ["-e"] = "extra", ["--extra-vars"] = "extra", ["-f"] = "forks", ["--forks"] = "forks", ["--json"] = "json",
  ["-t"] = "tags", ["--tags"] = "tags", ["--skip-tags"] = "skip_tags" }

--- Split `run` arguments into options and the file's own ARGS.
-- Options may come before or after FILE; `--` ends them.
-- @return opts, file, args or nil, message
function M.parse_run(args)
  local opts, rest, i = { extra = {} }, {}, 1
  local ended = false
  while i <= #args do
    local a = args[i]
    if ended then rest[#rest + 1] = a
    elseif a == "--" then ended = true
    elseif RUN_FLAGS[a] then opts[RUN_FLAGS[a]] = true
    elseif RUN_VALUES[a] or a:match("^%-%-[%w-]+=") then
      local name, value = a, nil
      if a:match("^%-%-[%w-]+=") then name, value = a:match("^(%-%-[%w-]+)=(.*)$") end
      local key = RUN_VALUES[name]
      if not key then return nil, "run: unknown option '" .. name .. "'" end
      if value == nil then
        i = i + 1
        value = args[i]
        if value == nil then return nil, "run: option " .. name .. " needs a value" end
      end
      if key == "extra" then opts.extra[#opts.extra + 1] = value else opts[key] = value end
    elseif a:match("^%-") and #rest == 0 then
      return nil, "run: unknown option '" .. a .. "'"
    else
      rest[#rest + 1] = a
    end
    i = i + 1
  end
  local file = table.remove(rest, 1)
  if not file then return nil, "run: missing FILE" end
  if opts.forks then
    opts.forks = math.tointeger(tonumber(opts.forks))
    if not opts.forks or opts.forks < 1 then return nil, "run: --forks needs a positive integer" end
  end
  return opts, file, rest
end

local function split_list(s)
  if not s then return nil end
  local t = {}
  for item in s:gmatch("[^,%s]+") do t[#t + 1] = item end
  return t
end

-- a recipe returned by the file: converge it on the inventory's hosts
local function run_recipe(r, opts)
  local inventory = require "kengine.inventory"
  local runner = require "kengine.runner"
  require "kengine.resources"
  local inv_path = opts.inventory or k.getenv("KENGINE_INVENTORY")
  if not inv_path then
    io.stderr:write("kengine: ", r.name, " is a recipe: give an inventory with -i FILE\n")
    return 2
  end
  local I, err = inventory.load(inv_path)
  if not I then io.stderr:write("kengine: ", err, "\n"); return 2 end
  local extra = {}
  for _, e in ipairs(opts.extra) do
    local v, perr = runner.parse_extra(e)
    if not v then io.stderr:write("kengine: ", perr, "\n"); return 2 end
    for key, x in pairs(v) do extra[key] = x end
  end
  local out, json = io.stdout, nil
  if opts.json == "-" then
    json, out = io.stdout, io.stderr
  elseif opts.json then
    local f, ferr = io.open(opts.json, "w")
    if not f then io.stderr:write("kengine: --json: ", ferr, "\n"); return 2 end
    json = f
  end
  local code = runner.run(r, { inventory = I, limit = opts.limit, check = opts.check, diff = opts.diff,
    extra_vars = extra, forks = opts.forks, verbose = opts.verbose, json = json, out = out,
    tags = split_list(opts.tags), skip_tags = split_list(opts.skip_tags), fail_fast = opts.fail_fast })
  if json and json ~= io.stdout then json:close() end
  return code
end

--- Run a Lua file as the main task; a file that returns a recipe converges
-- it on the inventory.  Returns the exit status.
function M.run_file(file, args, opts)
  opts = opts or { extra = {} }
  local recipe_mode = opts.inventory or opts.check or opts.limit or #opts.extra > 0
  local recipe = require "kengine.recipe"
  local fn, err = loadfile(file, "t", recipe.env())
  if not fn then
    io.stderr:write(err, "\n")
    return 2
  end
  local argt = { [0] = file }
  for i, a in ipairs(args) do argt[i] = a end
  _G.arg = argt
  local code
  local task = k.spawn(function()
    local res = table.pack(xpcall(fn, debug.traceback, table.unpack(args)))
    if not res[1] then
      io.stderr:write(tostring(res[2]), "\n")
      code = recipe_mode and 2 or 1
      return
    end
    local v = res[2]
    if recipe.is_recipe(v) then
      local ok, c = xpcall(run_recipe, debug.traceback, v, opts)
      if not ok then io.stderr:write(tostring(c), "\n"); c = 1 end
      code = c
    elseif recipe_mode then
      io.stderr:write("kengine: ", file, " does not return a recipe (k.recipe{...})\n")
      code = 2
    else
      code = math.type(v) == "integer" and v or 0
    end
  end)
  local run_ok, run_err = pcall(k.run)
  if not run_ok then
    io.stderr:write(tostring(run_err), "\n")
    return 1
  end
  local ok, terr = task:wait()
  if ok == nil and terr then io.stderr:write(tostring(terr), "\n"); return 1 end
  return code or 0
end

local commands = {}

-- commands that live in their own modules: each exports cli(args) -> status and HELP
local MODULE_COMMANDS = {
  inventory = "kengine.inventory",
  lab = "kengine.lab",
}
for name, modname in pairs(MODULE_COMMANDS) do
  commands[name] = function(args) return require(modname).cli(args) end
end

local function help_for(cmd)
  if HELP[cmd] then return HELP[cmd] end
  local modname = MODULE_COMMANDS[cmd]
  if modname then
    local ok, mod = pcall(require, modname)
    if ok and mod.HELP then return mod.HELP end
  end
  return nil
end

function commands.run(args)
  local opts, file, rest = M.parse_run(args)
  if not opts then return usage_error(file) end
  return M.run_file(file, rest, opts)
end

function commands.repl(args)
  if #args > 0 then return usage_error("repl: unexpected argument '" .. args[1] .. "'") end
  require("kengine.repl").run()
  return 0
end

function commands.version()
  local v = k.versions()
  print("kengine " .. v.kengine)
  print(v.lua)
  print("libssh " .. v.libssh)
  print("libcurl " .. v.libcurl)
  print("lua-cjson " .. v["lua-cjson"])
  return 0
end

function commands.help(args)
  local topic = args[1]
  if topic and help_for(topic) then io.stdout:write(help_for(topic)); return 0 end
  if topic then return usage_error("help: unknown command '" .. topic .. "'") end
  io.stdout:write(USAGE)
  return 0
end

--- Entry point from the binary.
-- @param args the command line without the program name
-- @return exit status
function M.main(args)
  local cmd = args[1]
  if cmd == nil then io.stderr:write(USAGE); return 2 end
  if cmd == "--help" or cmd == "-h" then io.stdout:write(USAGE); return 0 end
  if cmd == "--version" then cmd = "version" end
  local handler = commands[cmd]
  if not handler then return usage_error("unknown command '" .. cmd .. "'") end
  local rest = { table.unpack(args, 2) }
  -- `run FILE --help` belongs to FILE
  if cmd ~= "run" and wants_help(rest) or (cmd == "run" and rest[1] == "--help") then
    io.stdout:write(help_for(cmd) or USAGE)
    return 0
  end
  return handler(rest)
end

M.commands = commands
M.HELP = HELP

return M
