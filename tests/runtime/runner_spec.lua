-- The recipe runtime end to end: `kengine run RECIPE -i INV` against five real
-- sshd instances on loopback ports acting as five hosts.
local k = require "kengine"
local H = require "helpers"

local N = 5
local base, dirs, ports, inv_path, root

-- five sshd instances sharing one user key; one known_hosts for all
local function start_hosts()
  base = H.tmpdir("runtime")
  assert.equal(0, k.exec({ "chmod", "755", base }).code)
  dirs, ports = {}, {}
  for i = 1, N do
    dirs[i] = base .. "/sshd" .. i
    if i > 1 then
      assert.equal(0, k.exec({ "mkdir", "-p", dirs[i] }).code)
      assert.equal(0, k.exec("cp " .. dirs[1] .. "/id_ed25519* " .. dirs[1] .. "/authorized_keys " ..
        dirs[1] .. "/ssh_host_ed25519_key* " .. dirs[i] .. "/").code)
    end
    local r = k.exec({ "tests/support/sshd.sh", "start", dirs[i] })
    assert(r.code == 0, r.stderr)
    ports[i] = tonumber(k.read_file(dirs[i] .. "/port"))
  end
  local kh = {}
  for i = 1, N do kh[#kh + 1] = assert(k.read_file(dirs[i] .. "/known_hosts")) end
  assert(k.write_file(base .. "/known_hosts", table.concat(kh)))
end

local function write_inventory(extra_host_vars)
  local user = (k.read_file(dirs[1] .. "/user"):gsub("%s", ""))
  local lines = { "return {", "  hosts = {" }
  for i = 1, N do
    local hv = extra_host_vars and extra_host_vars[i] or ""
    lines[#lines + 1] = string.format('    h%d = { host = "127.0.0.1", port = %d, user = %q, vars = { root = %q, n = %d%s } },',
      i, ports[i], user, root .. "/h" .. i, i, hv)
  end
  lines[#lines + 1] = "  },"
  lines[#lines + 1] = '  groups = { web = { hosts = { "h1", "h2", "h3" }, vars = { role = "web", level = "group" } },'
  lines[#lines + 1] = '             db = { hosts = { "h4", "h5" }, vars = { role = "db" } },'
  lines[#lines + 1] = '             servers = { children = { "web", "db" }, vars = { level = "parent", tier = "servers" } } },'
  lines[#lines + 1] = '  vars = { level = "all", greeting = "hello" },'
  lines[#lines + 1] = string.format('  ssh = { identity = %q, known_hosts = %q, host_key = "strict" },',
    dirs[1] .. "/id_ed25519", base .. "/known_hosts")
  lines[#lines + 1] = "}"
  inv_path = base .. "/inventory.lua"
  assert(k.write_file(inv_path, table.concat(lines, "\n") .. "\n"))
end

local function recipe(name, body)
  local path = base .. "/" .. name .. ".lua"
  assert(k.write_file(path, body))
  return path
end

-- run kengine; returns code, stdout, stderr, events (decoded JSON lines)
local function run(args, opts)
  local json_path = base .. "/events-" .. math.random(1e9) .. ".json"
  local argv = { "run" }
  for _, a in ipairs(args) do argv[#argv + 1] = a end
  argv[#argv + 1] = "--json"
  argv[#argv + 1] = json_path
  local r = H.kengine(argv, opts)
  local events = {}
  local text = k.read_file(json_path) or ""
  for line in text:gmatch("[^\n]+") do events[#events + 1] = assert(k.json.decode(line)) end
  return r.code, r.stdout, r.stderr, events, text
end

local function steps(events, host)
  local out = {}
  for _, e in ipairs(events) do
    if e.event == "step" and (not host or e.host == host) then out[#out + 1] = e end
  end
  return out
end

local function recap(events)
  for _, e in ipairs(events) do if e.event == "recap" then return e.hosts end end
end

local function sh(cmd) return assert(k.exec(cmd)) end

describe("kengine run", function()
  setup(function()
    start_hosts()
    root = base .. "/targets"
    sh("mkdir -p " .. root .. " && chmod 777 " .. root)
    for i = 1, N do sh("mkdir -p " .. root .. "/h" .. i .. " && chmod 777 " .. root .. "/h" .. i) end
    write_inventory()
  end)
  teardown(function()
    for i = 1, N do k.exec({ "tests/support/sshd.sh", "stop", dirs[i] }) end
  end)

  it("runs all hosts at once", function()
    local f = recipe("conc", [[
      local k = require "kengine"
      return k.recipe { name = "conc", hosts = "all", run = function(h)
        h:exec("date +%s.%N > " .. h.vars.root .. "/start; sleep 1; date +%s.%N > " .. h.vars.root .. "/end")
      end }
    ]])
    local code, out = run({ f, "-i", inv_path })
    assert.equal(0, code, out)
    local first_end = math.huge
    for i = 1, N do first_end = math.min(first_end, tonumber(k.read_file(root .. "/h" .. i .. "/end"))) end
    for i = 1, N do assert.is_true(tonumber(k.read_file(root .. "/h" .. i .. "/start")) < first_end) end
  end)

  it("converges files: check changes nothing, first run changes, second run changes nothing", function()
    local f = recipe("motd", [[
      local k = require "kengine"
      return k.recipe { name = "motd", hosts = "all", vars = { message = "managed by kengine" },
        run = function(h)
          h:file { path = h.vars.root .. "/motd", content = h.vars.message .. " on " .. h.name .. "\n", mode = "0640" }
        end }
    ]])
    -- check mode on fresh hosts: changes reported, nothing written
    local code, out, _, events = run({ f, "-i", inv_path, "--check" })
    assert.equal(0, code, out)
    for i = 1, N do
      local s = steps(events, "h" .. i)
      assert.equal(1, #s)
      assert.equal("changed", s[1].status)
      assert.is_true(s[1].check)
      assert.is_nil(k.read_file(root .. "/h" .. i .. "/motd"))
    end
    code, out, _, events = run({ f, "-i", inv_path })
    assert.equal(0, code, out)
    for i = 1, N do
      assert.equal(1, recap(events)["h" .. i].changed)
      assert.equal("managed by kengine on h" .. i .. "\n", k.read_file(root .. "/h" .. i .. "/motd"))
      assert.equal("640", (sh({ "stat", "-c", "%a", root .. "/h" .. i .. "/motd" }).stdout:gsub("%s", "")))
    end
    code, out, _, events = run({ f, "-i", inv_path })
    assert.equal(0, code, out)
    for i = 1, N do
      assert.equal(0, recap(events)["h" .. i].changed)
      assert.equal(1, recap(events)["h" .. i].ok)
    end
    assert.matches("RECAP", out)
  end)

  it("shows unified diffs with --diff", function()
    local path = root .. "/h1/conf"
    assert(k.write_file(path, "a\nb\nc\n"))
    sh("chmod 666 " .. path)
    local f = recipe("diff", [[
      local k = require "kengine"
      return k.recipe { hosts = "h1", run = function(h)
        h:file { path = h.vars.root .. "/conf", content = "a\nB\nc\n" }
      end }
    ]])
    local code, out, _, events = run({ f, "-i", inv_path, "--diff", "--check" })
    assert.equal(0, code, out)
    assert.matches("\n    %-b\n", out)
    assert.matches("\n    %+B\n", out)
    assert.matches("@@ %-1,3 %+1,3 @@", steps(events)[1].diff)
    assert.equal("a\nb\nc\n", k.read_file(path))
  end)

  it("reports an unreachable host and converges the others, exit 1", function()
    assert.equal(0, k.exec({ "tests/support/sshd.sh", "stop", dirs[3] }).code)
    local f = recipe("touch", [[
      local k = require "kengine"
      return k.recipe { hosts = "all", run = function(h)
        h:file { path = h.vars.root .. "/touched", content = "x" }
      end }
    ]])
    local code, out, _, events = run({ f, "-i", inv_path })
    assert.equal(0, k.exec({ "tests/support/sshd.sh", "start", dirs[3], tostring(ports[3]) }).code)
    assert.equal(1, code)
    assert.equal(1, recap(events).h3.unreachable)
    assert.matches("%[h3%] UNREACHABLE ECONNREFUSED", out)
    for _, i in ipairs({ 1, 2, 4, 5 }) do assert.equal("x", k.read_file(root .. "/h" .. i .. "/touched")) end
  end)

  it("fires a handler once, and also after a later step failed", function()
    local f = recipe("handlers", [[
      local k = require "kengine"
      return k.recipe { hosts = "h1,h2", handlers = {
          restart = function(h) h:exec("echo fired >> " .. h.vars.root .. "/handler.log") end },
        run = function(h)
          h:file { path = h.vars.root .. "/a", content = tostring(os.time()) .. math.random(), notify = "restart" }
          h:file { path = h.vars.root .. "/b", content = tostring(os.time()) .. math.random(), notify = "restart" }
          if h.name == "h2" then h:exec("exit 7") end
          h:file { path = h.vars.root .. "/after", content = "not reached on h2" }
        end }
    ]])
    local code, out, _, events = run({ f, "-i", inv_path })
    assert.equal(1, code)
    assert.equal("fired\n", k.read_file(root .. "/h1/handler.log"))
    assert.equal("fired\n", k.read_file(root .. "/h2/handler.log"))
    assert.is_nil(k.read_file(root .. "/h2/after"))
    assert.equal(1, recap(events).h2.failed)
    -- the failure record: host, step, recipe file:line, command, exit status
    local failed
    for _, e in ipairs(steps(events, "h2")) do if e.status == "failed" then failed = e end end
    assert.equal("exit 7", failed.command)
    assert.equal(7, failed.code)
    assert.equal(f, failed.file)
    assert.equal(7, failed.line)
    assert.matches("%[h2%] failed%s+exec exit 7", out)
    assert.matches("at " .. f:gsub("%p", "%%%0") .. ":7", out)
  end)

  it("selects hosts with --limit patterns", function()
    local f = recipe("names", [[
      local k = require "kengine"
      return k.recipe { hosts = "all", run = function(h) h:exec("true", { check_safe = true }) end }
    ]])
    local function ran(limit)
      local _, _, _, events = run({ f, "-i", inv_path, "--limit", limit })
      local names = {}
      for name in pairs(recap(events)) do names[#names + 1] = name end
      table.sort(names)
      return table.concat(names, " ")
    end
    assert.equal("h1 h2 h3", ran("web"))
    assert.equal("h1 h2", ran("web:!h3"))
    assert.equal("h4 h5", ran("h[45]*"))
    assert.equal("h1 h5", ran("h1,h5"))
  end)

  it("merges variables: recipe < all < parent group < group < host < -e", function()
    write_inventory({ [2] = ', level = "host"' })
    local f = recipe("vars", [[
      local k = require "kengine"
      return k.recipe { hosts = "h1,h2,h4", vars = { level = "recipe", only_recipe = "r" }, run = function(h)
        h:file { path = h.vars.root .. "/vars", content = string.format("%s %s %s %s %s %s",
          h.vars.level, h.vars.only_recipe, h.vars.greeting, tostring(h.vars.tier), tostring(h.vars.role),
          tostring(h.vars.extra)) }
      end }
    ]])
    local code, out = run({ f, "-i", inv_path, "-e", "extra=5" })
    assert.equal(0, code, out)
    assert.equal("group r hello servers web 5", k.read_file(root .. "/h1/vars"))
    assert.equal("host r hello servers web 5", k.read_file(root .. "/h2/vars"))
    assert.equal("parent r hello servers db 5", k.read_file(root .. "/h4/vars"))
    code = run({ f, "-i", inv_path, "-e", "level=cli", "--limit", "h2" })
    assert.equal(0, code)
    assert.matches("^cli ", k.read_file(root .. "/h2/vars"))
    write_inventory()
  end)

  it("never shows a secret: commands, file contents, diffs, failures, -v, JSON", function()
    local f = recipe("secret", [[
      local k = require "kengine"
      local pw = k.secret("s3cr3t-Pa55word")
      return k.recipe { hosts = "h1", run = function(h)
        h:exec("echo " .. pw .. " > " .. h.vars.root .. "/secret.out")
        h:file { path = h.vars.root .. "/secret.conf", content = "password=" .. pw .. "\n" }
        h:exec("echo " .. pw .. " >&2; exit 3")
      end }
    ]])
    local code, out, err, _, json_text = run({ f, "-i", inv_path, "-v", "--diff" })
    assert.equal(1, code)
    assert.equal("s3cr3t-Pa55word\n", k.read_file(root .. "/h1/secret.out"))
    assert.equal("password=s3cr3t-Pa55word\n", k.read_file(root .. "/h1/secret.conf"))
    for _, text in ipairs({ out, err, json_text }) do
      assert.is_nil(text:find("s3cr3t", 1, true))
    end
    assert.matches("%*%*%*", out)
  end)

  it("fails a recipe with a syntax error or a typo'd global at file:line, exit 2", function()
    local f = recipe("syntax", "local k = require 'kengine'\nreturn k.recipe { run = function(h) h:exec( end }\n")
    local code, _, err = run({ f, "-i", inv_path })
    assert.equal(2, code)
    assert.matches(f:gsub("%p", "%%%0") .. ":2:", err)
    f = recipe("typo", "local k = require 'kengine'\nlocal x = 1\nreturn k.recipe { vars = { a = prnt } , run = function() end }\n")
    code, _, err = run({ f, "-i", inv_path })
    assert.equal(2, code)
    assert.matches(f:gsub("%p", "%%%0") .. ":3: undefined variable 'prnt'", err)
  end)

  it("fails a host at file:line when its run function reads an undefined global", function()
    local f = recipe("typo_run", "local k = require 'kengine'\nreturn k.recipe { hosts = 'h1', run = function(h)\n" ..
      "  h:exec(comand)\nend }\n")
    local code, out = run({ f, "-i", inv_path })
    assert.equal(1, code)
    assert.matches(f:gsub("%p", "%%%0") .. ":3: undefined variable 'comand'", out)
  end)

  it("does not run commands in check mode unless check_safe, and marks them skipped", function()
    local f = recipe("checkexec", [[
      local k = require "kengine"
      return k.recipe { hosts = "h1", run = function(h)
        local r = h:exec("touch " .. h.vars.root .. "/ran")
        local s = h:exec("echo safe", { check_safe = true })
        h:file { path = h.vars.root .. "/result", content = tostring(r.skipped) .. " " .. s.stdout }
      end }
    ]])
    local code, out, _, events = run({ f, "-i", inv_path, "--check" })
    assert.equal(0, code, out)
    local s = steps(events, "h1")
    assert.equal("skipped", s[1].status)
    assert.equal("ok", s[2].status)
    assert.is_nil(k.read_file(root .. "/h1/ran"))
    code = run({ f, "-i", inv_path })
    assert.equal(0, code)
    assert.equal("nil safe\n", k.read_file(root .. "/h1/result"))
  end)

  it("retries until a condition holds, honours changed_when, failed_when, creates and ignore_errors", function()
    local f = recipe("retries", [[
      local k = require "kengine"
      return k.recipe { hosts = "h1", run = function(h)
        local c = h.vars.root .. "/count"
        h:exec("echo x >> " .. c .. "; wc -l < " .. c, { retries = 5, delay = 0.1,
          ["until"] = function(r) return tonumber(r.stdout) >= 3 end })
        h:exec("true", { changed_when = false })
        h:exec("exit 2", { failed_when = function(r) return r.code > 2 end })
        h:exec("exit 1", { ignore_errors = true })
        h:exec("touch " .. h.vars.root .. "/created", { creates = h.vars.root .. "/created" })
      end }
    ]])
    local code, out, _, events = run({ f, "-i", inv_path })
    assert.equal(0, code, out)
    assert.equal("x\nx\nx\n", k.read_file(root .. "/h1/count"))
    local s = steps(events, "h1")
    assert.same({ "changed", "ok", "changed", "failed", "changed" },
      { s[1].status, s[2].status, s[3].status, s[4].status, s[5].status })
    code, out = run({ f, "-i", inv_path, "--tags", "none-such" })
    assert.equal(0, code, out)
    _, _, _, events = run({ f, "-i", inv_path })
    assert.equal("skipped", steps(events, "h1")[5].status)
  end)

  it("runs hosts in batches with serial, and a run_once step once for all hosts", function()
    local f = recipe("serial", [[
      local k = require "kengine"
      return k.recipe { hosts = "web", serial = 2, run = function(h)
        local first = h:run_once("stamp", function(h0)
          h0:exec("echo once >> " .. h0.vars.root .. "/../once.log")
          return h0.name
        end)
        h:exec("date +%s.%N > " .. h.vars.root .. "/s.start; sleep 0.5; date +%s.%N > " .. h.vars.root .. "/s.end")
        h:file { path = h.vars.root .. "/first", content = first }
      end }
    ]])
    os.remove(root .. "/once.log")
    local code, out = run({ f, "-i", inv_path })
    assert.equal(0, code, out)
    assert.equal("once\n", k.read_file(root .. "/once.log"))
    -- every host got the result of the one run, made by a host of the first batch
    local first = k.read_file(root .. "/h1/first")
    assert.is_truthy(first == "h1" or first == "h2", first)
    for i = 2, 3 do assert.equal(first, k.read_file(root .. "/h" .. i .. "/first")) end
    -- h1 and h2 form the first batch; h3 starts after both ended
    local t = function(i, what) return tonumber(k.read_file(root .. "/h" .. i .. "/s." .. what)) end
    assert.is_true(t(3, "start") > math.max(t(1, "end"), t(2, "end")))
    assert.is_true(t(2, "start") < t(1, "end"))
  end)

  it("stops every host with --fail-fast and skips tagged steps with --skip-tags", function()
    local f = recipe("failfast", [[
      local k = require "kengine"
      return k.recipe { hosts = "all", run = function(h)
        if h.name == "h1" then h:exec("exit 1") end
        h:exec("sleep 1")
        h:exec("touch " .. h.vars.root .. "/after-fail", { tags = { "late" } })
      end }
    ]])
    for i = 1, N do os.remove(root .. "/h" .. i .. "/after-fail") end
    local code, out = run({ f, "-i", inv_path, "--fail-fast" })
    assert.equal(1, code)
    for i = 1, N do assert.is_nil(k.read_file(root .. "/h" .. i .. "/after-fail")) end
    assert.matches("stopped: another host failed", out)
    local _, _, _, events = run({ f, "-i", inv_path, "--limit", "h2", "--skip-tags", "late" })
    local s = steps(events, "h2")
    assert.equal("skipped", s[#s].status)
    assert.is_nil(k.read_file(root .. "/h2/after-fail"))
  end)

  it("reads an Ansible INI inventory", function()
    local ini = base .. "/hosts.ini"
    local user = (k.read_file(dirs[1] .. "/user"):gsub("%s", ""))
    assert(k.write_file(ini, string.format([[
[web]
h1 ansible_host=127.0.0.1 ansible_port=%d ansible_user=%s root=%s/h1
h2 ansible_host=127.0.0.1 ansible_port=%d ansible_user=%s root=%s/h2

[all:vars]
ansible_ssh_private_key_file=%s
]], ports[1], user, root, ports[2], user, root, dirs[1] .. "/id_ed25519")))
    local f = recipe("ini", [[
      local k = require "kengine"
      return k.recipe { hosts = "web", run = function(h) h:file { path = h.vars.root .. "/ini", content = h.name } end }
    ]])
    local code, out = run({ f, "-i", ini }, { env = { KENGINE_KNOWN_HOSTS = base .. "/known_hosts" } })
    assert.equal(0, code, out)
    assert.equal("h1", k.read_file(root .. "/h1/ini"))
    assert.equal("h2", k.read_file(root .. "/h2/ini"))
  end)
end)
