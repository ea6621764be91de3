-- Inventories: kengine's Lua form, Ansible INI and YAML, host patterns, variable precedence, and
-- `kengine inventory` against Ansible's own `ansible-inventory` on the same files.
local k = require "kengine"
local H = require "helpers"
local cjson = require "cjson"
local json = require "kengine.json"
local inv = require "kengine.inventory"

local FIX = "tests/fixtures/inventory/"

local function load(name) return assert(inv.load(FIX .. name)) end

local function range(fmt, from, to)
  local t = {}
  for i = from, to do t[#t + 1] = string.format(fmt, i) end
  return t
end

local function write(name, text)
  local path = H.tmpdir("inv") .. "/" .. name
  assert(k.write_file(path, text))
  return path
end

describe("the Lua form", function()
  local I
  setup(function() I = load("inventory.lua") end)

  it("reads hosts with their address, port, user and own vars", function()
    assert.equal("lua", I.format)
    assert.same({ name = "web1", host = "203.0.113.10", user = "admin", vars = { replicas = 3, level = "host" },
                  groups = { "web" } }, I.hosts.web1)
    assert.same({ name = "web2", host = "203.0.113.11", port = 2222, vars = {}, groups = { "web" } }, I.hosts.web2)
    assert.same({ name = "solo", host = "solo", vars = {}, groups = { "ungrouped" } }, I.hosts.solo)
    assert.same({ ansible_user = "postgres" }, I.hosts.db2.vars)
    assert.same({ timezone = "UTC", level = "all" }, I.vars)
    assert.same({ identity = "~/.ssh/id_ed25519", host_key = "accept-new", user = "root" }, I.ssh)
  end)

  it("has groups of groups under all, and ungrouped as Ansible does", function()
    assert.same({ "ungrouped", "servers" }, I.groups.all.children)
    assert.same({ "web", "db" }, I.groups.servers.children)
    assert.same({ "servers" }, I.groups.web.parents)
    assert.same({ "solo" }, I.groups.ungrouped.hosts)
    assert.same({ "db1", "db2", "web1", "web2" }, inv.select(I, "servers"))
  end)

  it("gives each host its connection: ssh defaults < vars at any level < the host's own fields", function()
    assert.same({ host = "203.0.113.10", user = "admin", identity = "~/.ssh/id_ed25519", host_key = "accept-new" },
      inv.connection(I, "web1"))
    assert.same({ host = "203.0.113.11", port = 2222, user = "root", identity = "~/.ssh/id_ed25519",
                  host_key = "accept-new" }, inv.connection(I, "web2"))
    assert.same("postgres", inv.connection(I, "db1").user)
    assert.same({ nil, "EINVENTORY: unknown host 'nope'", "EINVENTORY" }, { inv.connection(I, "nope") })
  end)

  it("reads ansible_* connection vars and per-host ssh overrides", function()
    local J = assert(inv.from_table({
      hosts = { a = { vars = { ansible_host = "192.0.2.1", ansible_port = "2200",
                                ansible_ssh_private_key_file = "/keys/a", ansible_become = "yes" } },
                b = { ssh = { port = 2022, timeout = 5 } } },
      groups = { g = { hosts = { "a", "b" }, vars = { ansible_user = "deploy" } } },
      ssh = { port = 22 },
    }, "t"))
    assert.same({ host = "192.0.2.1", port = 2200, user = "deploy", identity = "/keys/a", sudo = true },
      inv.connection(J, "a"))
    assert.same({ host = "b", port = 2022, user = "deploy", timeout = 5 }, inv.connection(J, "b"))
    assert.equal("192.0.2.1", J.hosts.a.host)
    assert.equal(2200, J.hosts.a.port)
  end)

  it("rejects a cycle of groups", function()
    assert.same({ nil, "EINVENTORY: t: groups.c.children: group cycle: adding 'a' as a child of 'c' makes a " ..
                  "loop (a -> b -> c -> a)", "EINVENTORY" },
      { inv.from_table({ groups = { a = { children = { "b" } }, b = { children = { "c" } },
                                    c = { children = { "a" } } } }, "t") })
    assert.same({ nil, "EINVENTORY: t: groups.a.children: group 'a' cannot be a child of itself", "EINVENTORY" },
      { inv.from_table({ groups = { a = { children = { "a" } } } }, "t") })
  end)

  it("rejects unknown keys and wrong types, naming the key", function()
    local function err(t) return select(2, inv.from_table(t, "inv.lua")) end
    assert.equal("EINVENTORY: inv.lua: unknown key 'hostz' (expected groups, hosts, ssh, vars)", err({ hostz = {} }))
    assert.equal("EINVENTORY: inv.lua: vars: table expected, got string", err({ vars = "UTC" }))
    assert.equal("EINVENTORY: inv.lua: hosts.web1: unknown key 'adress' (expected groups, host, port, ssh, user, " ..
      "vars)", err({ hosts = { web1 = { adress = "x" } } }))
    assert.equal("EINVENTORY: inv.lua: hosts.web1.port: number expected, got string",
      err({ hosts = { web1 = { port = "22" } } }))
    assert.equal("EINVENTORY: inv.lua: hosts.web1.port: a port number 1-65535 expected, got 70000",
      err({ hosts = { web1 = { port = 70000 } } }))
    assert.equal("EINVENTORY: inv.lua: groups.web.hosts: table expected, got string",
      err({ groups = { web = { hosts = "web1" } } }))
    assert.equal("EINVENTORY: inv.lua: groups.web.children: unknown group 'dbs'",
      err({ groups = { web = { children = { "dbs" } } } }))
    assert.equal("EINVENTORY: inv.lua: ssh.port: number expected, got string", err({ ssh = { port = "22" } }))
    assert.equal("EINVENTORY: inv.lua: groups.all: 'all' is implicit (use the top-level vars for every host)",
      err({ groups = { all = {} } }))
  end)

  it("runs the file without globals: a typo'd name fails with file:line", function()
    local f = write("typo.lua", "return {\n  hosts = { web1 = { host = hostname } },\n}\n")
    assert.same({ nil, "EINVENTORY: " .. f .. ":2: undefined variable 'hostname'", "EINVENTORY" }, { inv.load(f) })
    f = write("io.lua", 'return { vars = { x = io.open("/etc/passwd") } }')
    assert.same({ nil, "EINVENTORY: " .. f .. ":1: undefined variable 'io'", "EINVENTORY" }, { inv.load(f) })
    f = write("nottable.lua", "return 42")
    assert.same({ nil, "EINVENTORY: " .. f .. ": the inventory must return a table, got number", "EINVENTORY" },
      { inv.load(f) })
    f = write("syntax.lua", "return {\n  hosts = {\n")
    assert.matches("^EINVENTORY: " .. f:gsub("%p", "%%%0") .. ":3: ", select(2, inv.load(f)))
  end)

  it("keeps secrets as they are and prints them as ***", function()
    local pw = k.secret("hunter2-inventory")
    local J = assert(inv.from_table({ hosts = { db = { vars = { password = pw } } },
                                      ssh = { password = pw } }, "t"))
    assert.is_true(rawequal(pw, inv.host_vars(J, "db").password))
    assert.is_true(rawequal(pw, inv.connection(J, "db").password))
    assert.same({ password = "***" }, inv.ansible_list(J)._meta.hostvars.db)
    assert.is_nil(inv.to_json(inv.ansible_list(J)):find("hunter2", 1, true))
    local f = write("secret.lua", 'local k = require "kengine"\n' ..
      'return { hosts = { db = { vars = { password = k.secret("hunter2-cli") } } } }\n')
    local r = H.kengine({ "inventory", "-i", f, "--host", "db" })
    assert.equal(0, r.code)
    assert.same({ password = "***" }, cjson.decode(r.stdout))
    assert.is_nil((r.stdout .. r.stderr):find("hunter2", 1, true))
  end)
end)

describe("host patterns", function()
  local L, N
  setup(function() L, N = load("inventory.lua"), load("hosts.ini") end)

  it("selects everything with all or *", function()
    local everyone = { "db1", "db2", "solo", "web1", "web2" }
    assert.same(everyone, inv.select(L, "all"))
    assert.same(everyone, inv.select(L, "*"))
    assert.same(everyone, inv.select(L))
  end)

  it("selects a host, a group with its child groups, and globs", function()
    assert.same({ "web1" }, inv.select(L, "web1"))
    assert.same({ "web1", "web2" }, inv.select(L, "web"))
    assert.same({ "web1", "web2" }, inv.select(L, "web*"))
    assert.same({ "db1", "db2", "web1", "web2" }, inv.select(L, "servers"))
    assert.same(range("www0%d.example.com", 1, 9), inv.select(N, "www0*"))
    assert.equal(51, #inv.select(N, "web"))
    assert.equal(58, #inv.select(N, "servers"))
  end)

  it("excludes with !, unites with : and , and intersects with :&", function()
    assert.same({ "db1", "db2", "solo", "web2" }, inv.select(L, "!web1"))
    assert.same({ "db1", "db2", "web2" }, inv.select(L, "servers:!web1"))
    assert.same({ "db1", "web1", "web2" }, inv.select(L, "web:db1"))
    assert.same({ "db1", "web1", "web2" }, inv.select(L, "web,db1"))
    assert.same({ "web1", "web2" }, inv.select(L, "servers:&web"))
    assert.same({ "web2" }, inv.select(L, "servers:&web*:!web1"))
    assert.same({ "db-a", "db-b", "db-c", "db-d", "db-e", "db-f" }, inv.select(N, "db:!db-primary"))
    assert.same({ "bastion", "standalone" }, inv.select(N, "edge:ungrouped"))
  end)

  it("fails on a name that matches no host or group", function()
    assert.same({ nil, "EINVENTORY: no host or group matches 'nope'", "EINVENTORY" }, { inv.select(L, "nope") })
    assert.same({ nil, "EINVENTORY: no host or group matches 'nope'", "EINVENTORY" },
      { inv.select(L, "web:!nope") })
    assert.same({ nil, "EINVENTORY: no host or group matches 'zz*'", "EINVENTORY" }, { inv.select(L, "zz*") })
  end)
end)

describe("variable precedence", function()
  it("is all < parent group < child group < host in the Lua form", function()
    local L = load("inventory.lua")
    assert.equal("host", inv.host_vars(L, "web1").level)
    assert.equal("web", inv.host_vars(L, "web2").level)
    assert.equal("db", inv.host_vars(L, "db1").level)
    assert.equal("all", inv.host_vars(L, "solo").level)
    assert.same({ timezone = "UTC", level = "web", admin_user = "deploy", http_port = 8080,
                  ansible_host = "203.0.113.11", ansible_port = 2222 }, inv.host_vars(L, "web2"))
  end)

  it("is all < parent group < child group < host in the Ansible forms", function()
    for _, f in ipairs({ "hosts.ini", "hosts.yml" }) do
      local I = load(f)
      assert.equal("all", inv.host_vars(I, "bastion").level)
      assert.equal("web", inv.host_vars(I, "www07.example.com").level)
      assert.equal("db", inv.host_vars(I, "db-c").level)
      assert.equal("admin", inv.host_vars(I, "db-primary").ansible_user)   -- from servers
      assert.equal("postgres", inv.host_vars(I, "db-c").ansible_user)      -- its own
    end
    assert.equal("host", inv.host_vars(load("hosts.ini"), "db-primary").level)
    assert.equal("host", inv.host_vars(load("hosts.yml"), "web-canary").level)
  end)

  it("orders groups of the same depth by ansible_group_priority, then name", function()
    local text = "[a]\nh1\n[b]\nh1\n[a:vars]\nx=a\n[b:vars]\nx=b\n"
    assert.equal("b", inv.host_vars(assert(inv.parse(text, "ini")), "h1").x)
    local I = assert(inv.parse(text .. "[a:vars]\nansible_group_priority=5\n", "ini"))
    assert.equal("a", inv.host_vars(I, "h1").x)
    assert.equal(5, I.groups.a.priority)
  end)

  it("returns copies: changing them leaves the inventory alone", function()
    local I = load("hosts.yml")
    local v = inv.host_vars(I, "web-canary")
    v.dns[1] = "changed"
    assert.equal("192.0.2.53", inv.host_vars(I, "web-canary").dns[1])
  end)
end)

describe("Ansible INI", function()
  local I
  setup(function() I = load("hosts.ini") end)

  it("expands host ranges", function()
    assert.same(range("www%02d.example.com", 1, 50), { table.unpack(I.groups.web.hosts, 1, 50) })
    assert.same({ "db-a", "db-b", "db-c", "db-d", "db-e", "db-f", "db-primary" }, I.groups.db.hosts)
  end)

  it("reads ansible_host, ansible_port, ansible_user and host:port", function()
    assert.same({ "198.51.100.7", 2200, "jump" }, { I.hosts.bastion.host, I.hosts.bastion.port, I.hosts.bastion.user })
    assert.same({ "standalone", 2222 }, { I.hosts.standalone.host, I.hosts.standalone.port })
    assert.same({ "ungrouped" }, I.hosts.standalone.groups)
    assert.same({ host = "10.0.0.5", port = 5432, user = "admin" }, inv.connection(I, "db-primary"))
  end)

  it("types values as Ansible does: Python literals, else strings", function()
    local v = inv.host_vars(I, "web-canary")
    assert.equal(5, v.weight)
    assert.equal(true, v.canary)
    assert.equal("two words", v.note)
    assert.equal(8080, v.http_port)
    assert.same({ "frontend", "public" }, v.tags)
    assert.same({ cpu = 2, mem = "512M" }, v.limits)
    assert.equal("managed by kengine", v.motd)
    assert.equal("keep 'inner' quotes", v.quoted)
    assert.equal("007", v.leading_zero)
    assert.equal(0.25, v.ratio)
    assert.equal("yes", inv.host_vars(I, "db-a").backup)
  end)

  it("reads group vars and children", function()
    assert.same({ "web", "db" }, I.groups.servers.children)
    assert.same({ "ungrouped", "servers", "edge" }, I.groups.all.children)
    assert.same({ level = "servers", ansible_user = "admin", ntp_server = "ntp.example.com" }, I.groups.servers.vars)
    assert.same({ level = "all", timezone = "UTC" }, I.vars)
  end)
end)

describe("Ansible YAML", function()
  local I
  setup(function() I = load("hosts.yml") end)

  it("reads nested children, ranges in host keys, and host:port keys", function()
    assert.equal("yaml", I.format)
    assert.same({ "ungrouped", "servers", "edge" }, I.groups.all.children)
    assert.same({ "web", "db" }, I.groups.servers.children)
    assert.same(range("www%02d.example.com", 1, 50), { table.unpack(I.groups.web.hosts, 1, 50) })
    assert.same({ "standalone", 2222 }, { I.hosts.standalone.host, I.hosts.standalone.port })
    assert.same({ "198.51.100.7", 2200, "jump" }, { I.hosts.bastion.host, I.hosts.bastion.port, I.hosts.bastion.user })
    assert.same({ "edge" }, I.hosts.bastion.groups)
  end)

  it("types scalars as YAML 1.1 (PyYAML) does, merges <<, and keeps null", function()
    local v = inv.host_vars(I, "web-canary")
    assert.equal(1.1, v.release)
    assert.equal("007", v.build)
    assert.equal("2024-01-31", v.since)
    assert.same({ server = "ntp.example.com", iburst = false }, v.ntp_override)
    assert.equal(true, inv.host_vars(I, "db-a").backup)
    assert.equal(json.null, inv.host_vars(I, "db-a").empty)
  end)

  it("detects YAML in a file without an extension", function()
    local J = load("hosts_noext")
    assert.equal("yaml", J.format)
    assert.same({ "lab1", "lab2", "lab3" }, inv.select(J, "lab"))
  end)
end)

describe("bad input", function()
  it("names file:line for a malformed INI line", function()
    assert.same({ nil, "EINVENTORY: " .. FIX .. "bad_line.ini:4: Expected key=value host variable assignment, " ..
                  "got: oops", "EINVENTORY" }, { inv.load(FIX .. "bad_line.ini") })
    assert.same({ nil, "EINVENTORY: " .. FIX .. "cycle.ini:5: group cycle: adding 'a' as a child of 'b' makes a " ..
                  "loop (a -> b -> a)", "EINVENTORY" }, { inv.load(FIX .. "cycle.ini") })
    assert.same({ nil, "EINVENTORY: t:2: Section [web:children] includes undefined group: dbs", "EINVENTORY" },
      { inv.parse("[web:children]\ndbs\n", "ini", "t") })
  end)

  it("names file:line for malformed YAML", function()
    local _, err, code = inv.load(FIX .. "bad_syntax.yml")
    assert.equal("EINVENTORY", code)
    assert.equal("EINVENTORY: " .. FIX .. "bad_syntax.yml:5: invalid YAML: did not find expected ',' or ']' at " ..
      "column 9 (while parsing a flow sequence at line 4, column 21)", err)
    assert.same({ nil, "EINVENTORY: " .. FIX .. 'bad_structure.yml:5: invalid "hosts" entry for "web" group, ' ..
                  'requires a dictionary, found "list" instead.', "EINVENTORY" }, { inv.load(FIX .. "bad_structure.yml") })
  end)

  it("returns ENOENT for a missing file", function()
    assert.same({ nil, "ENOENT: " .. FIX .. "missing.ini: no such file", "ENOENT" }, { inv.load(FIX .. "missing.ini") })
  end)
end)

describe("kengine inventory", function()
  it("prints usage errors with exit 2 and load errors with exit 1", function()
    local r = H.kengine({ "inventory", "--help" })
    assert.equal(0, r.code)
    assert.matches("^usage: kengine inventory", r.stdout)
    r = H.kengine({ "inventory", "-i", FIX .. "hosts.ini" })
    assert.equal(2, r.code)
    assert.matches("give one of %-%-list, %-%-host NAME or %-%-graph", r.stderr)
    assert.equal(2, H.kengine({ "inventory", "--list", "--frobnicate" }).code)
    r = H.kengine({ "inventory", "-i", FIX .. "bad_line.ini", "--list" })
    assert.equal(1, r.code)
    assert.equal("kengine inventory: EINVENTORY: " .. FIX .. "bad_line.ini:4: Expected key=value host variable " ..
      "assignment, got: oops\n", r.stderr)
    r = H.kengine({ "inventory", "-i", FIX .. "hosts.ini", "--host", "nope" })
    assert.equal(1, r.code)
    assert.equal("kengine inventory: EINVENTORY: no host or group matches 'nope'\n", r.stderr)
  end)

  it("prints the Lua form in ansible-inventory's shape", function()
    local r = H.kengine({ "inventory", "-i", FIX .. "inventory.lua", "--list" })
    assert.equal(0, r.code)
    local out = cjson.decode(r.stdout)
    assert.same({ children = { "ungrouped", "servers" } }, out.all)
    assert.same({ children = { "web", "db" } }, out.servers)
    assert.same({ hosts = { "web1", "web2" } }, out.web)
    assert.same({ hosts = { "solo" } }, out.ungrouped)
    assert.same({ ansible_host = "203.0.113.10", ansible_user = "admin", replicas = 3, level = "host",
                  timezone = "UTC", admin_user = "deploy", http_port = 8080 }, out._meta.hostvars.web1)
  end)
end)

-- The important one: kengine reads an Ansible inventory exactly as Ansible does.
describe("kengine inventory -i F and ansible-inventory -i F", function()
  local CASES = {
    { file = FIX .. "hosts.ini", hosts = { "web-canary", "db-primary", "bastion", "standalone" } },
    { file = FIX .. "hosts.yml", hosts = { "web-canary", "db-c", "bastion" } },
    { file = FIX .. "hosts_noext", hosts = { "lab2" } },
  }
  local COMMANDS = { { "--list" }, { "--list", "--export" }, { "--graph" } }
  local results = {}

  local function key(file, args) return file .. " " .. table.concat(args, " ") end

  setup(function()
    assert(k.exec({ "sh", "-c", "command -v ansible-inventory" }).code == 0,
      "ansible-inventory not found: ansible-core is a test dependency (make deps)")
    local home = H.tmpdir("ansible")
    assert(k.write_file(home .. "/ansible.cfg", ""))
    local env = { ANSIBLE_HOME = home, ANSIBLE_LOCAL_TEMP = home .. "/tmp", ANSIBLE_CONFIG = home .. "/ansible.cfg",
                  ANSIBLE_NOCOLOR = "1", ANSIBLE_INVENTORY_UNPARSED_FAILED = "1",
                  ANSIBLE_INVENTORY_ENABLED = "yaml,ini", ANSIBLE_DEPRECATION_WARNINGS = "0" }
    local jobs = {}
    for _, c in ipairs(CASES) do
      for _, args in ipairs(COMMANDS) do jobs[#jobs + 1] = { c.file, args } end
      for _, h in ipairs(c.hosts) do jobs[#jobs + 1] = { c.file, { "--host", h } } end
    end
    -- ansible-inventory takes a second or more per run: run them all at once
    local got = k.parallel(jobs, function(job)
      local file, args = job[1], job[2]
      local theirs = assert(k.exec({ "ansible-inventory", "-i", file, table.unpack(args) }, { env = env }))
      local ours = H.kengine({ "inventory", "-i", file, table.unpack(args) })
      return { theirs = theirs, ours = ours }
    end)
    for i, job in ipairs(jobs) do results[key(job[1], job[2])] = got[i] end
  end)

  local function check(file, args)
    local r = results[key(file, args)]
    assert(r, "no result for " .. key(file, args))
    assert.equal(0, r.theirs.code, r.theirs.stderr)
    assert.equal(0, r.ours.code, r.ours.stderr)
    return r
  end

  for _, c in ipairs(CASES) do
    it("agree on --list of " .. c.file, function()
      local r = check(c.file, { "--list" })
      assert.same(cjson.decode(r.theirs.stdout), cjson.decode(r.ours.stdout))
    end)

    it("agree on --list --export of " .. c.file, function()
      local r = check(c.file, { "--list", "--export" })
      assert.same(cjson.decode(r.theirs.stdout), cjson.decode(r.ours.stdout))
    end)

    it("agree on --graph of " .. c.file, function()
      local r = check(c.file, { "--graph" })
      assert.equal(r.theirs.stdout, r.ours.stdout)
    end)

    it("agree on --host of " .. c.file, function()
      for _, h in ipairs(c.hosts) do
        local r = check(c.file, { "--host", h })
        assert.same(cjson.decode(r.theirs.stdout), cjson.decode(r.ours.stdout))
      end
    end)
  end
end)
