--- Shared test helpers: where the harness servers are, how to reach them.
local k = require "kengine"

local H = {}

local function need(name)
  local v = k.getenv(name)
  assert(v, name .. " is not set: run the specs through tests/run.sh")
  return v
end

local function trim(s) return (s:gsub("%s+$", "")) end

H.bin = k.getenv("KENGINE_BIN") or "./kengine"
H.tmp = need("KG_TEST_TMP")

--- The loopback sshd: {dir, port, user, identity, wrong_identity, known_hosts}
function H.sshd()
  local dir = need("KG_TEST_SSHD")
  return {
    dir = dir,
    port = tonumber(trim(assert(k.read_file(dir .. "/port")))),
    user = trim(assert(k.read_file(dir .. "/user"))),
    identity = dir .. "/id_ed25519",
    wrong_identity = dir .. "/wrong_ed25519",
    known_hosts = dir .. "/known_hosts",
  }
end

--- connect options for the loopback sshd, overridden by extra
function H.ssh_opts(extra)
  local s = H.sshd()
  local o = { host = "127.0.0.1", port = s.port, user = s.user, identity = s.identity,
              known_hosts = s.known_hosts, timeout = 10, config = false }
  for key, v in pairs(extra or {}) do o[key] = v end
  return o
end

function H.connect(extra)
  return assert(k.ssh.connect(H.ssh_opts(extra)))
end

--- The HTTPS server: {dir, port, base, cacert, sock, client_cert, client_key}
function H.https()
  local dir = need("KG_TEST_HTTPS")
  local port = trim(assert(k.read_file(dir .. "/port")))
  return {
    dir = dir, port = tonumber(port), base = "https://127.0.0.1:" .. port,
    cacert = dir .. "/ca.pem", sock = dir .. "/http.sock",
    client_cert = dir .. "/client.pem", client_key = dir .. "/client.key",
  }
end

--- A fresh temporary directory under the run's tmp.
local counter = 0
function H.tmpdir(tag)
  counter = counter + 1
  local d = string.format("%s/%s-%d-%d", H.tmp, tag or "t", counter, math.random(1e9))
  assert(k.exec({ "mkdir", "-p", d }).code == 0)
  return d
end

--- Run the kengine binary; returns {code, stdout, stderr}
function H.kengine(args, opts)
  local argv = { H.bin }
  for _, a in ipairs(args) do argv[#argv + 1] = a end
  return assert(k.exec(argv, opts))
end

--- Number of this process's TCP connections to 127.0.0.1:port (via ss).
function H.connections_to(port)
  local r = assert(k.exec({ "sh", "-c",
    "ss -tnpH state established dst 127.0.0.1:" .. port .. " | grep -c \"pid=$PPID,\" || true" }))
  return tonumber(r.stdout)
end

--- The lab for this test run: `kengine lab up 3 --name kgtest`, made once
-- (tests/run.sh removes it at exit).  Returns {name, inventory (path),
-- hosts = {name -> {host, port, user, vars}}, ssh = {identity, known_hosts}}.
function H.lab()
  if H._lab then return H._lab end
  local name = k.getenv("KG_TEST_LAB") or "kgtest"
  local r = H.kengine({ "lab", "up", "3", "--name", name })
  assert(r.code == 0, "kengine lab up failed:\n" .. r.stdout .. r.stderr)
  local p = H.kengine({ "lab", "inventory", "--name", name })
  assert(p.code == 0, p.stderr)
  local path = p.stdout:gsub("%s+$", "")
  local inv = assert(loadfile(path, "t", {}))()
  H._lab = { name = name, inventory = path, hosts = inv.hosts, ssh = inv.ssh, groups = inv.groups }
  return H._lab
end

--- A lab of n fresh hosts for one spec (removed first if it exists; the
-- spec's teardown removes it, tests/run.sh too).  Same shape as H.lab().
function H.fresh_lab(name, n)
  H.kengine({ "lab", "down", "--name", name })
  local r = H.kengine({ "lab", "up", tostring(n), "--name", name })
  assert(r.code == 0, "kengine lab up failed:\n" .. r.stdout .. r.stderr)
  local path = H.kengine({ "lab", "inventory", "--name", name }).stdout:gsub("%s+$", "")
  local inv = assert(loadfile(path, "t", {}))()
  return { name = name, inventory = path, hosts = inv.hosts, ssh = inv.ssh, groups = inv.groups }
end

--- A direct SSH session to a lab host (for checking state independently of resources).
function H.lab_connect(host, lab)
  lab = lab or H.lab()
  local hv = assert(lab.hosts[host], "no lab host " .. host)
  return assert(k.ssh.connect { host = hv.host, port = hv.port, user = hv.user or "root",
    identity = lab.ssh.identity, known_hosts = lab.ssh.known_hosts, config = false, timeout = 30 })
end

--- Run a recipe file on the lab with extra kengine arguments.
-- @return code, stdout, stderr, events (decoded --json lines)
function H.lab_run(recipe_path, args)
  local lab = H.lab()
  local json_path = H.tmpdir("events") .. "/events.json"
  local argv = { "run", recipe_path, "-i", lab.inventory, "--json", json_path }
  for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
  local r = H.kengine(argv)
  local events = {}
  for line in (k.read_file(json_path) or ""):gmatch("[^\n]+") do events[#events + 1] = assert(k.json.decode(line)) end
  return r.code, r.stdout, r.stderr, events
end

--- The helpers every lab resource spec uses, bound to one lab host.
-- `target()` returns the host's name and a direct session to it (set in the
-- spec's setup).  sh(cmd, allow_fail) → stdout, code (asserting exit 0
-- unless allow_fail); recipe(body) → a recipe file whose run is body on that
-- host; run(path, args…) → {code, out, steps, recap, events}; converge(path,
-- n, after_check): --check reports n changes and changes nothing, a run
-- makes them, a second run changes nothing.
function H.lab_kit(target)
  local kit = {}
  function kit.sh(cmd, allow_fail)
    local _, s = target()
    local r = assert(s:exec(cmd))
    if not allow_fail then assert(r.code == 0, cmd .. ": " .. r.stderr .. r.stdout) end
    return r.stdout, r.code
  end
  function kit.recipe(body)
    return H.recipe(string.format('local k = require "kengine"\nreturn k.recipe { hosts = %q, run = function(h)\n%s\nend }\n',
      (target()), body))
  end
  function kit.run(path, ...)
    local host = target()
    local code, out, err, events = H.lab_run(path, { ... })
    return { code = code, out = out .. err, steps = H.steps(events, host), recap = (H.recap(events) or {})[host] or {},
      events = events }
  end
  function kit.converge(path, expect_changed, after_check)
    local assert = require "luassert" -- busted's assert; this module sees Lua's own
    local c = kit.run(path, "--check", "--diff")
    assert.equal(0, c.code, c.out)
    assert.equal(expect_changed, c.recap.changed, c.out)
    if after_check then after_check(c) end
    local r = kit.run(path, "--diff")
    assert.equal(0, r.code, r.out)
    assert.equal(expect_changed, r.recap.changed, r.out)
    local again = kit.run(path)
    assert.equal(0, again.code, again.out)
    assert.equal(0, again.recap.changed, again.out)
    return c, r
  end
  return kit
end

--- Step events of a run, optionally for one host.
function H.steps(events, host)
  local out = {}
  for _, e in ipairs(events) do
    if e.event == "step" and (not host or e.host == host) then out[#out + 1] = e end
  end
  return out
end

--- The recap event's per-host counts.
function H.recap(events)
  for _, e in ipairs(events) do if e.event == "recap" then return e.hosts end end
end

--- Write a recipe into a temp file and return its path.
function H.recipe(body, name)
  local path = H.tmpdir("recipe") .. "/" .. (name or "recipe") .. ".lua"
  assert(k.write_file(path, body))
  return path
end

return H
