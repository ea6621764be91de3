-- The Rancher and Kubernetes clients against the simulator (tests/sim/), which
-- follows shared/reference/rancher-kubernetes-api.md and is tested against it.
local k = require "kengine"
local H = require "helpers"
local rancher = require "kengine.rancher"
local k8s = require "kengine.k8s"

local BOOT = "bootstrap-pass-1"
local ADMIN = "a-much-longer-admin-password"

local function start_sim(args)
  local dir = H.tmpdir("sim")
  local argv = { "python3", "tests/sim/rancher_sim.py", "--dir", dir, "--bootstrap-password", BOOT,
    "--ready-seconds", "1" }
  for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
  local task = k.spawn(k.exec, argv, { timeout = 600 })
  for _ = 1, 200 do
    if k.read_file(dir .. "/ready") then break end
    k.sleep(0.05)
  end
  assert(k.read_file(dir .. "/ready"), "simulator did not start")
  local port = (k.read_file(dir .. "/port"):gsub("%s", ""))
  return { dir = dir, url = "https://127.0.0.1:" .. port, cacert = dir .. "/ca.pem", task = task,
    stop = function() k.exec({ "sh", "-c", "kill $(cat " .. dir .. "/pid)" }); task:wait() end }
end

local function bootstrap(sim)
  local c = rancher.new { url = sim.url, cacert = sim.cacert }
  local tok = assert(c:login("admin", BOOT))
  c.token = tok
  assert(c:change_password(BOOT, ADMIN))
  return c
end

describe("rancher client", function()
  local sim, legacy
  setup(function()
    sim = start_sim({ "--login-shape", "v2.13" })
    legacy = start_sim({ "--login-shape", "legacy" })
  end)
  teardown(function() sim.stop(); legacy.stop() end)

  it("pings", function()
    assert.is_true(rancher.new { url = sim.url, cacert = sim.cacert }:ping())
  end)

  it("verifies TLS against the given CA only", function()
    local ok, msg, code = rancher.new { url = sim.url }:ping()
    assert.is_nil(ok)
    assert.equal("ETLS", code)
    assert.matches("/ping", msg)
  end)

  it("logs in with the v2.13 shape and the legacy shape (falling back to /v3-public)", function()
    for _, s in ipairs({ sim, legacy }) do
      local c = rancher.new { url = s.url, cacert = s.cacert }
      local tok, name = c:login("admin", k.secret(BOOT))
      assert.truthy(tok, name)
      assert.is_true(require("kengine.secret").is(tok))
      assert.matches("^token%-%w+$", name)
    end
    local lines = k.read_file(legacy.dir .. "/access.log")
    assert.matches("/v1%-public/login", lines)
    assert.matches("/v3%-public/localProviders/local%?action=login", lines)
  end)

  it("reports wrong credentials with Rancher's code and message", function()
    for _, s in ipairs({ sim, legacy }) do
      local tok, msg, code = rancher.new { url = s.url, cacert = s.cacert }:login("admin", "wrong-password!")
      assert.is_nil(tok)
      assert.equal("Unauthorized", code)
      assert.matches("401 Unauthorized: authentication failed", msg)
    end
  end)

  it("reports missing credentials (string status) and norman errors", function()
    local c = rancher.new { url = sim.url, cacert = sim.cacert }
    local v, msg, code = c:setting("server-url")
    assert.is_nil(v)
    assert.equal("Unauthorized", code)
    assert.equal("Rancher GET /v3/settings/server-url: 401 Unauthorized: must authenticate", msg)
    c.token = assert(c:login("admin", BOOT))
    local ok
    ok, msg, code = c:change_password(BOOT, "short")
    assert.is_nil(ok)
    assert.equal("InvalidBodyContent", code)
    assert.matches("422 InvalidBodyContent: Password must be at least 12 characters", msg)
  end)

  it("bootstraps: password change, server-url, API token, kubeconfig", function()
    local c = bootstrap(sim)
    assert.is_true(c:set_setting("server-url", "https://rancher.example"))
    assert.is_false(c:set_setting("server-url", "https://rancher.example"))
    local api = rancher.new { url = sim.url, cacert = sim.cacert, token = assert(c:create_token { description = "t" }) }
    assert.is_true(api:token_valid())
    local cfg = assert(api:kubeconfig("local"))
    -- the wrapped CA line parses to the simulator's CA
    local parsed = assert(k8s.parse_kubeconfig(cfg))
    assert.equal("https://rancher.example/k8s/clusters/local", parsed.server)
    assert.equal(k.read_file(sim.dir .. "/ca.pem"), parsed.ca_pem)
    assert.is_true(require("kengine.secret").is(parsed.token))
    assert.is_false(rancher.new { url = sim.url, cacert = sim.cacert, token = "token-xxxxx:nope" }:token_valid())
  end)

  it("keeps the ext/ prefix on the bearer value and strips it from the name", function()
    local ext = start_sim({ "--ext-login-tokens" })
    local c = rancher.new { url = ext.url, cacert = ext.cacert }
    local tok, name = assert(c:login("admin", BOOT))
    assert.matches("^ext/", require("kengine.secret").reveal(tok))
    assert.not_matches("^ext/", name)
    c.token = tok
    assert.is_true(c:token_valid())
    ext.stop()
  end)
end)

describe("k8s client", function()
  local sim, kc
  setup(function()
    sim = start_sim()
    local c = bootstrap(sim)
    local cfg = assert(k8s.parse_kubeconfig(assert(c:kubeconfig("local"))))
    cfg.server = sim.url .. "/k8s/clusters/local" -- the controller's route to it
    kc = assert(k8s.new(cfg))
  end)
  teardown(function() kc:close(); sim.stop() end)

  local function deployment(replicas, image)
    return { apiVersion = "apps/v1", kind = "Deployment",
      metadata = { name = "hello", labels = { app = "hello" } },
      spec = { replicas = replicas, selector = { matchLabels = { app = "hello" } },
        template = { metadata = { labels = { app = "hello" } },
          spec = { containers = { { name = "hello", image = image or "hello:1", ports = { { containerPort = 8080 } } } } } } } }
  end

  it("answers /version through Rancher's proxy", function()
    local v = assert(kc:version())
    assert.is_string(v.gitVersion)
  end)

  it("creates, leaves unchanged, updates, scales and rolls out a Deployment", function()
    local st, d = kc:apply("deployments", deployment(2), nil, { "replicas" })
    assert.equal("created", st)
    assert.equal(1, d.metadata.generation)
    st = kc:apply("deployments", deployment(2), nil, { "replicas" })
    assert.equal("unchanged", st)
    d = assert(kc:rollout_wait("hello", nil, 30, 0.2))
    assert.equal(2, d.status.readyReplicas)
    local scale = assert(kc:scale("hello", 4))
    assert.equal("Scale", scale.kind)
    assert.equal(4, scale.spec.replicas)
    d = assert(kc:rollout_wait("hello", nil, 30, 0.2))
    assert.equal(4, d.status.availableReplicas)
    assert.equal(4, #assert(kc:pods("app=hello")))
    st = kc:apply("deployments", deployment(2, "hello:2"), nil, { "replicas" })
    assert.equal("updated", st)
    d = assert(kc:rollout_wait("hello", nil, 30, 0.2))
    assert.equal(4, d.spec.replicas) -- replicas left to the scale subresource
    assert.equal("hello:2", d.spec.template.spec.containers[1].image)
  end)

  it("turns API errors into kubectl-like messages", function()
    local v, msg, reason = kc:create("deployments", deployment(1))
    assert.is_nil(v)
    assert.equal("AlreadyExists", reason)
    assert.equal('deployments.apps "hello" already exists (409 AlreadyExists)', msg)
    v, msg, reason = kc:get("deployments", "nope")
    assert.is_nil(v)
    assert.equal('deployments.apps "nope" not found (404 NotFound)', msg)
    assert.equal("NotFound", reason)
    v, msg, reason = kc:scale("hello", -1)
    assert.is_nil(v)
    assert.equal("Invalid", reason)
    assert.matches("%(422 Invalid%)$", msg)
    local bad = deployment(1)
    bad.metadata.name = "mismatch"
    bad.spec.selector.matchLabels.app = "other"
    v, msg, reason = kc:create("deployments", bad)
    assert.is_nil(v)
    assert.equal("Invalid", reason)
    assert.matches('^Deployment.apps "mismatch" is invalid: .*%(422 Invalid%)$', msg)
    local stale = assert(kc:get("deployments", "hello"))
    stale.metadata.resourceVersion = "1"
    v, msg, reason = kc:replace("deployments", stale)
    assert.is_nil(v)
    assert.equal("Conflict", reason)
    assert.matches("the object has been modified", msg)
  end)

  it("exposes a Service and deletes what it made", function()
    local svc = { apiVersion = "v1", kind = "Service", metadata = { name = "hello" },
      spec = { type = "NodePort", selector = { app = "hello" }, ports = { { port = 80, targetPort = 8080, protocol = "TCP" } } } }
    local st, live = kc:apply("services", svc)
    assert.equal("created", st)
    assert.is_true(live.spec.ports[1].nodePort >= 30000)
    assert.equal("unchanged", (kc:apply("services", svc)))
    assert.truthy(kc:delete("services", "hello"))
    assert.truthy(kc:delete("deployments", "hello"))
    local _, _, reason = kc:get("services", "hello")
    assert.equal("NotFound", reason)
  end)
end)
