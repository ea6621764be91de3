-- recipes/examples/ and recipes/base.lua run on their own, on a fresh lab host:
-- check mode changes nothing, the first run converges, the second changes nothing.
local k = require "kengine"
local H = require "helpers"

describe("example recipes and base.lua on a fresh lab host", function()
  local lab, host
  setup(function()
    lab = H.fresh_lab((k.getenv("KG_TEST_LAB") or "kgtest") .. "e", 1)
    host = lab.name .. "-1"
  end)
  teardown(function() H.kengine({ "lab", "down", "--name", lab.name }) end)

  local function run(recipe, args)
    local json_path = H.tmpdir("events") .. "/events.json"
    local argv = { "run", recipe, "-i", lab.inventory, "--json", json_path }
    for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
    local r = H.kengine(argv, { timeout = 600 })
    local events = {}
    for line in (k.read_file(json_path) or ""):gmatch("[^\n]+") do events[#events + 1] = assert(k.json.decode(line)) end
    return r.code, r.stdout .. r.stderr, H.recap(events)[host]
  end

  local function converges(recipe, args, check)
    local code, out, c = run(recipe, { "--check", table.unpack(args or {}) })
    assert.equal(0, code, out)
    assert.is_true(c.changed > 0, out)
    local s = H.lab_connect(host, lab)
    check(s, false)
    code, out, c = run(recipe, args)
    assert.equal(0, code, out)
    assert.is_true(c.changed > 0)
    check(s, true)
    code, out, c = run(recipe, args)
    assert.equal(0, code, out)
    assert.equal(0, c.changed, out)
    s:close()
  end

  it("motd.lua", function()
    converges("recipes/examples/motd.lua", {}, function(s, done)
      local motd = s:exec("cat /etc/motd").stdout
      assert.equal(done, motd == "managed by kengine on " .. host .. "\n")
    end)
  end)

  it("tools.lua", function()
    converges("recipes/examples/tools.lua", {}, function(s, done)
      assert.equal(done, s:exec("command -v jq && command -v tree").code == 0)
      assert.equal(done, s:exec("grep -qx EDITOR=vi /etc/environment").code == 0)
    end)
  end)

  it("deploy_user.lua", function()
    local key = (assert(k.read_file(lab.ssh.identity .. ".pub")):gsub("%s+$", ""))
    converges("recipes/examples/deploy_user.lua", { "-e", k.json.encode({ key = key }) }, function(s, done)
      assert.equal(done, s:exec("id deploy").code == 0)
      assert.equal(done, (s:exec("cat /home/deploy/.ssh/authorized_keys 2>/dev/null").stdout:find(key, 1, true)) ~= nil)
    end)
  end)

  it("base.lua", function()
    local key = (assert(k.read_file(lab.ssh.identity .. ".pub")):gsub("%s+$", ""))
    local vars = k.json.encode({ admin_users = { { name = "admin1", keys = { key } } }, timezone = "Europe/Berlin" })
    converges("recipes/base.lua", { "-e", vars }, function(s, done)
      assert.equal(done, s:exec("id -nG admin1 | grep -qw sudo").code == 0)
      assert.equal(done, s:exec("readlink /etc/localtime").stdout == "/usr/share/zoneinfo/Europe/Berlin\n")
      assert.equal(done, s:exec("test -f /etc/ssh/sshd_config.d/50-kengine.conf").code == 0)
    end)
    -- the hardened sshd still lets the admin user in with the key, and sudo works
    local lab_host = lab.hosts[host]
    local s = assert(k.ssh.connect { host = lab_host.host, port = lab_host.port, user = "admin1",
      identity = lab.ssh.identity, known_hosts = lab.ssh.known_hosts, config = false })
    assert.equal("root\n", s:exec("sudo -n id -un").stdout)
    s:close()
  end)
end)
