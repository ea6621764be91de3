-- The mission end to end on a lab host: recipes/full.lua converges a fresh
-- Debian host (users, sshd, packages, Docker, nginx, Rancher (the simulator
-- image), kubeconfig, kubectl, the demo service on Kubernetes and on Docker),
-- a re-run changes nothing, replicas scale, check mode changes nothing, and a
-- run that failed halfway resumes cleanly.
local k = require "kengine"
local H = require "helpers"

local host -- the one host of this spec's own lab: fresh, whatever other specs did
local vars_path, http_port, lab

local function full(args, env)
  local json_path = H.tmpdir("events") .. "/events.json"
  local argv = { "run", "recipes/full.lua", "-i", lab.inventory, "--limit", host, "-e", "@" .. vars_path,
    "--json", json_path }
  for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
  local e = { KENGINE_RANCHER_BOOTSTRAP_PASSWORD = "mission-boot-1", KENGINE_RANCHER_ADMIN_PASSWORD = "mission-admin-password-1" }
  for key, v in pairs(env or {}) do e[key] = v end
  local r = H.kengine(argv, { env = e, timeout = 900 })
  local events = {}
  for line in (k.read_file(json_path) or ""):gmatch("[^\n]+") do events[#events + 1] = assert(k.json.decode(line)) end
  return r.code, r.stdout .. r.stderr, events
end

local function changed_steps(events)
  local out = {}
  for _, s in ipairs(H.steps(events)) do if s.status == "changed" then out[#out + 1] = s.step end end
  return out
end

local function distinct_hostnames(n_requests, want)
  -- bounded: at most 20 rounds of n requests, 0.5 s apart (nginx reloads asynchronously)
  local seen, count = {}, 0
  for _ = 1, 20 do
    seen, count = {}, 0
    for _ = 1, n_requests do
      local res = k.http.get("http://127.0.0.1:" .. http_port .. "/", { timeout = 5 })
      local name = res and res.status == 200 and res.body:match("Hello from (%w+)")
      if name and not seen[name] then seen[name] = true; count = count + 1 end
    end
    if count >= want then break end
    k.sleep(0.5)
  end
  return count, seen
end

describe("recipes/full.lua on a lab host", function()
  setup(function()
    lab = H.fresh_lab((k.getenv("KG_TEST_LAB") or "kgtest") .. "m", 1)
    host = lab.name .. "-1"
    http_port = lab.hosts[host].vars.lab_http_port
    local tar = H.tmp .. "/lab-image.tar"
    assert.equal(0, k.exec({ "docker", "save", "kengine-lab:bookworm", "-o", tar }, { timeout = 300 }).code)
    local pub = (assert(k.read_file(lab.ssh.identity .. ".pub")):gsub("%s+$", ""))
    vars_path = H.tmpdir("mission") .. "/vars.json"
    assert(k.write_file(vars_path, k.json.encode({
      admin_users = { { name = "deploy", keys = { pub } } },
      docker_storage_driver = "vfs", rancher_sim = true, rancher_sim_base = tar, webservice_docker = true,
    })))
  end)

  teardown(function() H.kengine({ "lab", "down", "--name", lab.name }) end)

  it("reports the changes in check mode on a fresh host and changes nothing", function()
    local code, out, events = full({ "--check" })
    assert.equal(0, code, out)
    assert.is_true(#changed_steps(events) >= 5, out)
    local s = H.lab_connect(host, lab)
    assert.equal(1, s:exec("id deploy").code)
    assert.equal(1, s:exec("command -v docker").code)
    s:close()
  end)

  it("fails halfway without the admin password, then resumes cleanly", function()
    local code, out = full({}, { KENGINE_RANCHER_ADMIN_PASSWORD = "" })
    assert.equal(1, code)
    assert.matches("KENGINE_RANCHER_ADMIN_PASSWORD", out)
    -- the first half is in place
    local s = H.lab_connect(host, lab)
    assert.equal(0, s:exec("id deploy").code)
    assert.equal(0, s:exec("docker inspect rancher >/dev/null").code)
    s:close()
  end)

  it("converges everything, and the parts are really there", function()
    local code, out, events = full()
    assert.equal(0, code, out)
    assert.is_true(#changed_steps(events) > 0)
    local s = H.lab_connect(host, lab)
    -- users, sudo, sshd hardening
    assert.matches("docker", s:exec("id -nG deploy").stdout)
    assert.matches("PasswordAuthentication no", s:get("/etc/ssh/sshd_config.d/50-kengine.conf"))
    -- Rancher answers behind nginx with TLS, bootstrapped: the API token is stored root-only
    assert.equal("600", (s:exec("stat -c %a /etc/kengine/rancher/token").stdout:gsub("%s", "")))
    assert.equal("600", (s:exec("stat -c %a /home/deploy/.kube/config").stdout:gsub("%s", "")))
    -- kubectl on the server, as the admin user
    local nodes = s:exec("su -s /bin/sh -c 'kubectl get nodes -o json' deploy")
    assert.equal(0, nodes.code, nodes.stderr)
    assert.equal(1, #assert(k.json.decode(nodes.stdout)).items)
    s:close()
    assert.matches("hello: 3 replica%(s%)", out)
    -- the docker backend: requests through nginx reach several replicas
    assert.equal(3, (distinct_hostnames(12, 3)))
  end)

  it("changes nothing on a second run, and needs no bootstrap password", function()
    local code, out, events = full({}, { KENGINE_RANCHER_BOOTSTRAP_PASSWORD = "" })
    assert.equal(0, code, out)
    assert.same({}, changed_steps(events))
  end)

  it("scales to 5 replicas, and says so", function()
    local code, out, events = full({ "-e", "replicas=5" })
    assert.equal(0, code, out)
    assert.matches("scale 3 → 5", out)
    assert.matches("hello: 5 replica%(s%)", out)
    local changed = table.concat(changed_steps(events), "\n")
    assert.matches("k8s_scale deployments/hello", changed)
    assert.matches("docker_container hello%-5", changed)
    assert.equal(5, (distinct_hostnames(20, 5)))
    code, out, events = full({ "-e", "replicas=5" })
    assert.equal(0, code, out)
    assert.same({}, changed_steps(events))
  end)

  it("removes the service with state=absent", function()
    local code, out = full({ "-e", "state=absent", "-e", "webservice_docker=false" })
    assert.equal(0, code, out)
    assert.matches("k8s_object services/hello .*delete", out)
    assert.matches("k8s_object deployments/hello .*delete", out)
  end)
end)
