-- The kengine binary's command line: run, repl, version, help, exit codes.
local k = require "kengine"
local H = require "helpers"

local function script(body)
  local path = H.tmpdir("cli") .. "/script.lua"
  assert(k.write_file(path, body))
  return path
end

describe("kengine run", function()
  it("passes ARGS in arg and exits 0", function()
    local f = script('print(arg[0]:match("script.lua$"), arg[1], arg[2], #arg)')
    local r = H.kengine({ "run", f, "a", "b c" })
    assert.equal(0, r.code)
    assert.equal("script.lua\ta\tb c\t2\n", r.stdout)
  end)

  it("prints file:line: message and a traceback for an error, exit 1", function()
    local f = script('local x = 1\nerror("broken here")\n')
    local r = H.kengine({ "run", f })
    assert.equal(1, r.code)
    assert.matches("^" .. f:gsub("%p", "%%%0") .. ":2: broken here\nstack traceback:\n", r.stderr)
  end)

  it("reports a syntax error with file:line, exit 2 (a load error)", function()
    local f = script("local x = = 1\n")
    local r = H.kengine({ "run", f })
    assert.equal(2, r.code)
    assert.matches(f:gsub("%p", "%%%0") .. ":1: unexpected symbol near '='", r.stderr)
  end)

  it("waits for spawned tasks before exiting", function()
    local f = script('local k = require "kengine"\nk.spawn(function() k.sleep(0.1) print("late") end)\nprint("early")')
    local r = H.kengine({ "run", f })
    assert.equal(0, r.code)
    assert.equal("early\nlate\n", r.stdout)
  end)

  it("reports a missing file, exit 2", function()
    local r = H.kengine({ "run", "/nonexistent/recipe.lua" })
    assert.equal(2, r.code)
    assert.matches("cannot open /nonexistent/recipe.lua", r.stderr)
  end)
end)

describe("kengine usage", function()
  it("exits 2 on an unknown command or missing argument", function()
    local r = H.kengine({ "frobnicate" })
    assert.equal(2, r.code)
    assert.matches("unknown command 'frobnicate'", r.stderr)
    assert.equal(2, H.kengine({ "run" }).code)
    assert.equal(2, H.kengine({}).code)
  end)

  it("has help for every command", function()
    for _, cmd in ipairs({ "run", "repl", "version", "help" }) do
      local r = H.kengine({ cmd, "--help" })
      assert.equal(0, r.code)
      assert.matches("^usage: kengine " .. cmd, r.stdout)
    end
    local r = H.kengine({ "help" })
    assert.equal(0, r.code)
    assert.matches("commands:", r.stdout)
  end)

  it("prints the versions of kengine, Lua, libssh, libcurl and lua-cjson", function()
    local r = H.kengine({ "version" })
    assert.equal(0, r.code)
    assert.matches("^kengine %d+%.%d+%.%d+\nLua 5%.4%.%d+\nlibssh 0%.%d+%.%d+.-\nlibcurl %d+%.%d+%.%d+\n" ..
      "lua%-cjson 2%.1%.0\n$", r.stdout)
  end)
end)

describe("kengine repl", function()
  local function repl(input)
    return H.kengine({ "repl" }, { stdin = input, env = { KENGINE_HISTORY = H.tmpdir("hist") .. "/h" } })
  end

  it("evaluates expressions and pretty-prints tables", function()
    local r = repl("1 + 2\n{b = 1, a = {1, 2}}\n")
    assert.equal(0, r.code)
    assert.equal("3\n{\n  a = {\n    1,\n    2,\n  },\n  b = 1,\n}\n", r.stdout)
  end)

  it("continues incomplete chunks on the next line", function()
    local r = repl("function f(x)\n  return x * 2\nend\nf(21)\n")
    assert.equal("42\n", r.stdout)
  end)

  it("has k loaded and keeps going after an error", function()
    local r = repl("k.version\nerror('oops')\nk.json.encode({1})\n")
    assert.matches('^"%d+%.%d+%.%d+"\n', r.stdout)
    assert.matches("oops", r.stdout)
    assert.matches('"%[1%]"\n$', r.stdout)
  end)
end)
