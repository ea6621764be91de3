-- docker, docker_image and docker_container against Docker inside a real Debian lab host (dockerd with the
-- vfs storage driver, started without systemd).  Every state is checked directly over a separate SSH
-- session (`docker inspect`, `docker image inspect`, curl inside the host), never through the resources.
-- No registry is reachable: the base image is a ~2 MB static busybox made here as a `docker save` tarball
-- (tests/fixtures/docker/mkimage.sh; needs busybox-static on this machine) and loaded on the host; the web
-- image is built on the host from tests/fixtures/docker/web.
local k = require "kengine"
local H = require "helpers"

local HOST, S
local TARBALL, BB_ID
local RND = tostring(math.random(1e8))
local WEB = "kg-web-" .. RND .. ":1"
local CTR = "kgweb-" .. RND
local PORT = 18000 + math.random(999)
local SECRET = "kg-sekrit-" .. RND .. "-tok"


local kit = H.lab_kit(function() return HOST, S end)
local sh, recipe, run = kit.sh, kit.recipe, kit.run
local function trim(s) return (s:gsub("%s+$", "")) end



local function container(extra)
  return string.format([[
h:docker_container { name = %q, image = %q, ports = { "127.0.0.1:%d:80" }, restart = "unless-stopped",
  stop_timeout = 1, env = { GREETING = %q, API_TOKEN = k.secret(%q) }%s }]], CTR, WEB, PORT,
    extra and extra.greeting or "hello-kg", SECRET, extra and extra.more or "")
end

local function inspect(fmt)
  local out, code = sh("docker inspect --type container --format '" .. fmt .. "' " .. CTR .. " 2>/dev/null", true)
  if code ~= 0 then return nil end
  return trim(out)
end

-- curl inside the lab host, retried while the container's httpd starts (bounded)
local function page()
  for _ = 1, 30 do
    local out, code = sh("curl -sf --max-time 2 http://127.0.0.1:" .. PORT .. "/", true)
    if code == 0 then return trim(out) end
    k.sleep(0.2)
  end
  return nil
end

describe("docker resources on a lab host", function()
  setup(function()
    local lab = H.lab()
    HOST = lab.name .. "-1"
    S = H.lab_connect(HOST)
    TARBALL = H.tmpdir("docker") .. "/busybox.tar"
    local r = assert(k.exec({ "sh", "tests/fixtures/docker/mkimage.sh", TARBALL }))
    assert(r.code == 0, "mkimage.sh: " .. r.stderr)
    BB_ID = trim(r.stdout)
  end)

  teardown(function()
    if S then
      sh("docker rm -f " .. CTR .. " " .. CTR .. ".kengine-new >/dev/null 2>&1; docker image rm " .. WEB ..
        " kg-web2-" .. RND .. ":1 >/dev/null 2>&1; true", true)
      S:close()
    end
  end)

  it("installs the engine with the vfs storage driver and starts dockerd without systemd", function()
    local path = recipe('h:docker { storage_driver = "vfs" }')
    local _, fresh = sh("command -v dockerd", true)
    fresh = fresh ~= 0
    local c = run(path, "--check", "--diff")
    assert.equal(0, c.code, c.out)
    if fresh then
      assert.equal(1, c.recap.changed, c.out)
      assert.matches("install docker.io", c.out, 1, true)
      assert.matches('+  "storage-driver": "vfs"', c.out, 1, true)
      assert.are_not.equal(0, select(2, sh("command -v dockerd", true)))
      assert.are_not.equal(0, select(2, sh("test -e /etc/docker/daemon.json", true)))
    end

    local t0 = k.now()
    local r = run(path)
    assert.equal(0, r.code, r.out)
    assert.equal(fresh and 1 or 0, r.recap.changed, r.out)
    if fresh then print(string.format("\n    engine install + start: %.1f s", k.now() - t0)) end
    assert.equal("vfs", trim(sh("docker info --format '{{.Driver}}'")))
    assert.equal("vfs", k.json.decode(sh("cat /etc/docker/daemon.json"))["storage-driver"])
    assert.equal(0, select(2, sh("docker version --format '{{.Server.Version}}'", true)))

    local again = run(path)
    assert.equal(0, again.code, again.out)
    assert.equal(0, again.recap.changed, again.out)
  end)

  it("loads an image from a tarball and builds one from a local context, once", function()
    local path = recipe(string.format([[
h:docker_image { tarball = %q }
h:docker_image { name = %q, context = "tests/fixtures/docker/web" }]], TARBALL, WEB))
    local c = run(path, "--check")
    assert.equal(0, c.code, c.out)
    assert.matches("build " .. WEB, c.out, 1, true)
    assert.are_not.equal(0, select(2, sh("docker image inspect " .. WEB .. " >/dev/null 2>&1", true)))

    local r = run(path)
    assert.equal(0, r.code, r.out)
    assert.is_true(r.recap.changed >= 1, r.out)
    assert.equal(BB_ID, trim(sh("docker image inspect --format '{{.Id}}' kengine-busybox:test")))
    local id = trim(sh("docker image inspect --format '{{.Id}}' " .. WEB))
    assert.matches("^%x+$", trim(sh("docker image inspect --format '{{index .Config.Labels \"kengine.context\"}}' " .. WEB)))

    local again = run(path)
    assert.equal(0, again.code, again.out)
    assert.equal(0, again.recap.changed, again.out)
    assert.equal(id, trim(sh("docker image inspect --format '{{.Id}}' " .. WEB)), "not rebuilt")
  end)

  it("rebuilds when the context changes, and removes an image", function()
    local ctx = H.tmpdir("ctx")
    assert(k.exec({ "cp", "-r", "tests/fixtures/docker/web/.", ctx }).code == 0)
    local name = "kg-web2-" .. RND .. ":1"
    local path = recipe(string.format('h:docker_image { name = %q, context = %q }', name, ctx))
    local r = run(path)
    assert.equal(0, r.code, r.out)
    assert.equal(1, r.recap.changed, r.out)
    local id1 = trim(sh("docker image inspect --format '{{.Id}}' " .. name))
    assert(k.write_file(ctx .. "/index.tmpl", "changed @HOST@\n"))
    r = run(path)
    assert.equal(0, r.code, r.out)
    assert.equal(1, r.recap.changed, r.out)
    assert.matches("rebuild", r.out, 1, true)
    local id2 = trim(sh("docker image inspect --format '{{.Id}}' " .. name))
    assert.are_not.equal(id1, id2)

    local gone = recipe(string.format('h:docker_image { name = %q, state = "absent" }', name))
    r = run(gone)
    assert.equal(0, r.code, r.out)
    assert.equal(1, r.recap.changed, r.out)
    assert.are_not.equal(0, select(2, sh("docker image inspect " .. name .. " >/dev/null 2>&1", true)))
    assert.equal(0, run(gone).recap.changed)
  end)

  it("creates a container once, keeps its id while the spec is unchanged, and keeps the secret off every output",
    function()
      local path = recipe(container())
      local c = run(path, "--check")
      assert.equal(0, c.code, c.out)
      assert.equal(1, c.recap.changed, c.out)
      assert.is_nil(inspect("{{.Id}}"), "check mode created the container")

      local r = run(path, "-v")
      assert.equal(0, r.code, r.out)
      assert.equal(1, r.recap.changed, r.out)
      local id = inspect("{{.Id}}")
      assert.is_string(id)
      assert.equal("running", inspect("{{.State.Status}}"))
      assert.equal("unless-stopped", inspect("{{.HostConfig.RestartPolicy.Name}}"))
      assert.equal('{"80/tcp":[{"HostIp":"127.0.0.1","HostPort":"' .. PORT .. '"}]}',
        inspect("{{json .HostConfig.PortBindings}}"))
      assert.equal("hello-kg from " .. id:sub(1, 12), page())
      -- the container has the secret; no output of kengine, and no command line, ever held it
      assert.equal(SECRET, trim(sh("docker exec " .. CTR .. " sh -c 'echo $API_TOKEN'")))
      assert.is_nil(r.out:find(SECRET, 1, true), "secret in the output (-v echoes every command)")
      for _, e in ipairs(r.events) do assert.is_nil(k.json.encode(e):find(SECRET, 1, true), "secret in an event") end
      sh("ps -eo args > /tmp/kg-ps.txt")
      assert.is_nil(sh("cat /tmp/kg-ps.txt"):find(SECRET, 1, true), "secret in ps")
      assert.equal("", sh("ls /tmp | grep kengine-env || true"), "env file left behind")

      local again = run(path)
      assert.equal(0, again.code, again.out)
      assert.equal(0, again.recap.changed, again.out)
      assert.equal(id, inspect("{{.Id}}"), "re-created although nothing changed")
    end)

  it("re-creates the container when the spec changes, and keeps the old one when the new one cannot be created",
    function()
      local id = inspect("{{.Id}}")
      local r = run(recipe(container { greeting = "changed-kg" }))
      assert.equal(0, r.code, r.out)
      assert.equal(1, r.recap.changed, r.out)
      assert.matches("re-create (spec changed)", r.out, 1, true)
      local id2 = inspect("{{.Id}}")
      assert.are_not.equal(id, id2)
      assert.equal("changed-kg from " .. id2:sub(1, 12), page())

      -- an option docker refuses: the step fails, the running container stays as it was
      local bad = run(recipe(container { greeting = "changed-kg", more = ', extra_args = { "--memory", "lots" }' }))
      assert.are_not.equal(0, bad.code)
      assert.equal(1, bad.recap.failed, bad.out)
      assert.matches("docker create " .. CTR, bad.out, 1, true)
      assert.equal(id2, inspect("{{.Id}}"))
      assert.equal("running", inspect("{{.State.Status}}"))
      assert.equal("", sh("docker ps -a --format '{{.Names}}' | grep kengine-new || true"))
    end)

  it("re-creates the container when its image was rebuilt (a new version of the service)", function()
    local id = inspect("{{.Id}}")
    local ctx = H.tmpdir("ctx2")
    assert(k.exec({ "cp", "-r", "tests/fixtures/docker/web/.", ctx }).code == 0)
    assert(k.write_file(ctx .. "/index.tmpl", "v2 @GREETING@ from @HOST@\n"))
    local path = recipe(string.format('h:docker_image { name = %q, context = %q }\n', WEB, ctx) ..
      container { greeting = "changed-kg" })
    local r = run(path)
    assert.equal(0, r.code, r.out)
    assert.equal(2, r.recap.changed, r.out)
    assert.matches("re-create (image " .. WEB .. " changed)", r.out, 1, true)
    local id2 = inspect("{{.Id}}")
    assert.are_not.equal(id, id2)
    assert.equal("v2 changed-kg from " .. id2:sub(1, 12), page())
    assert.equal(0, run(path).recap.changed)
  end)

  it("stops and removes the container (state = stopped, absent)", function()
    local id = inspect("{{.Id}}")
    local stopped = recipe(container { greeting = "changed-kg", more = ', state = "stopped"' })
    local r = run(stopped)
    assert.equal(0, r.code, r.out)
    assert.equal(1, r.recap.changed, r.out)
    assert.equal("exited", inspect("{{.State.Status}}"))
    assert.equal(id, inspect("{{.Id}}"))
    assert.equal(0, run(stopped).recap.changed)

    local absent = recipe(string.format('h:docker_container { name = %q, state = "absent" }', CTR))
    local c = run(absent, "--check")
    assert.equal(1, c.recap.changed, c.out)
    assert.equal(id, inspect("{{.Id}}"))
    r = run(absent)
    assert.equal(0, r.code, r.out)
    assert.equal(1, r.recap.changed, r.out)
    assert.is_nil(inspect("{{.Id}}"))
    assert.equal(0, run(absent).recap.changed)
  end)

  it("normalizes published ports like docker's -p, with the default host address explicit", function()
    local docker = require "kengine.resources.docker"
    assert.equal("0.0.0.0:8080:80/tcp", docker.norm_port("8080:80", "0.0.0.0"))
    assert.equal("127.0.0.1:8080:80/udp", docker.norm_port("127.0.0.1:8080:80/udp", "0.0.0.0"))
    assert.equal("127.0.0.1::80/tcp", docker.norm_port(80, "127.0.0.1"))
    assert.equal("[::1]:8080:80/tcp", docker.norm_port("[::1]:8080:80", "0.0.0.0"))
    assert.equal("8080:80/tcp", docker.norm_port("8080:80", ""))
    assert.is_nil(docker.norm_port("a:b", "0.0.0.0"))
    assert.equal("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", docker.sha256(""))
    assert.equal("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", docker.sha256("abc"))
  end)
end)
