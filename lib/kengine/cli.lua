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
usage: kengine run FILE [ARGS...]

Runs FILE as Lua with `require "kengine"` available. ARGS go to the global
`arg` (arg[0] is FILE). The file runs as a task: SSH, HTTP, local commands and
sleeps inside it yield to one event loop, and tasks it spawns run concurrently.
kengine exits when every task has finished.

An error prints `file:line: message` and a traceback, and exits 1.
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
    if a == "--help" or a == "-h" then return true end
  end
  return false
end

--- Run a Lua file as the main task; returns the exit status.
function M.run_file(file, args)
  local fn, err = loadfile(file)
  if not fn then
    io.stderr:write(err, "\n")
    return 1
  end
  local argt = { [0] = file }
  for i, a in ipairs(args) do argt[i] = a end
  _G.arg = argt
  local task = k.spawn(function() return xpcall(fn, debug.traceback, table.unpack(args)) end)
  local run_ok, run_err = pcall(k.run)
  if not run_ok then
    io.stderr:write(tostring(run_err), "\n")
    return 1
  end
  local ok, res = task:wait()
  if not ok then
    io.stderr:write(tostring(res), "\n")
    return 1
  end
  if math.type(res) == "integer" then return res end
  return 0
end

local commands = {}

function commands.run(args)
  if #args < 1 then return usage_error("run: missing FILE") end
  local file = table.remove(args, 1)
  return M.run_file(file, args)
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
  if topic and HELP[topic] then io.stdout:write(HELP[topic]); return 0 end
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
    io.stdout:write(HELP[cmd])
    return 0
  end
  return handler(rest)
end

M.commands = commands
M.HELP = HELP

return M
