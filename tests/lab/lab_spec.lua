-- `kengine lab` against the real Docker daemon (tests/support/dockerd.sh starts
-- one): the image, a two-host lab, SSH with strict host keys, ports on
-- 127.0.0.1 only, what Docker inside a lab host needs, status/ssh/inventory,
-- down, and the errors.  Everything is reached on 127.0.0.1 through published
-- ports or the Docker socket; never a container's bridge address.
-- The first run builds the image with debootstrap (a few minutes).
local k = require "kengine"
local H = require "helpers"
local docker = require "kengine.docker"
local lab = require "kengine.lab"

local LAB = "kgtest"
local IMAGE = lab.DEFAULT_IMAGE

local d = docker.new()
local labdir, env

local function kengine_lab(args, extra_env, timeout)
  local argv = { "lab" }
  for _, a in ipairs(args) do argv[#argv + 1] = a end
  local e = {}
  for key, v in pairs(env) do e[key] = v end
  for key, v in pairs(extra_env or {}) do e[key] = v end
  return H.kengine(argv, { env = e, timeout = timeout or 300 })
end

local function inventory()
  return dofile(labdir .. "/" .. LAB .. "/inventory.lua")
end

local function lab_containers(name)
  return assert(d:containers { all = true, labels = { "io.kengine.lab=" .. (name or LAB) } })
end

local function connect(inv, name, extra)
  local h = inv.hosts[name]
  local o = { host = h.host, port = h.port, user = h.user, identity = inv.ssh.identity,
              known_hosts = inv.ssh.known_hosts, host_key = inv.ssh.host_key, config = false, agent = false,
              timeout = 10 }
  for key, v in pairs(extra or {}) do o[key] = v end
  return k.ssh.connect(o)
end

describe("kengine lab", function()
  setup(function()
    assert(d:ping(), "Docker must answer on /var/run/docker.sock: run tests/support/dockerd.sh")
    labdir = H.tmpdir("labs")
    env = { KENGINE_LAB_DIR = labdir }
    if not d:image_inspect(IMAGE) then
      local r = kengine_lab({ "image" }, nil, 1800)
      assert(r.code == 0, "kengine lab image failed:\n" .. r.stdout .. r.stderr)
    end
    -- containers left by an aborted run (their files went with its tmp dir)
    kengine_lab({ "down", "--name", LAB })
  end)

  teardown(function()
    kengine_lab({ "down", "--name", LAB })
  end)

  it("has the image, with sshd as its command and no host keys baked in", function()
    local info = assert(d:image_inspect(IMAGE))
    assert.same({ "/usr/local/sbin/kengine-lab-init" }, info.Config.Cmd)
    local r = kengine_lab({ "image" })
    assert.equal(0, r.code)
    assert.matches("^" .. IMAGE:gsub("%p", "%%%0") .. " exists", r.stdout)
  end)

  it("starts two hosts with `lab up 2` and writes an inventory", function()
    local r = kengine_lab({ "up", "2", "--name", LAB })
    assert.equal(0, r.code, r.stderr)
    assert.matches("kgtest%-1%s+running%s+%d+%s+%d+%s+%d+", r.stdout)
    assert.matches("kgtest%-2%s+running", r.stdout)
    assert.matches("inventory:%s+" .. (labdir .. "/kgtest/inventory.lua"):gsub("%p", "%%%0"), r.stdout)

    local inv = inventory()
    assert.same({ "kgtest-1", "kgtest-2" }, inv.groups.lab.hosts)
    assert.same({ "kgtest-1", "kgtest-2" }, inv.groups.servers.hosts)
    assert.same({ identity = labdir .. "/kgtest/id_ed25519", known_hosts = labdir .. "/kgtest/known_hosts",
                  host_key = "strict" }, inv.ssh)
    for _, name in ipairs({ "kgtest-1", "kgtest-2" }) do
      local h = inv.hosts[name]
      assert.equal("127.0.0.1", h.host)
      assert.equal("root", h.user)
      assert.equal("integer", math.type(h.port))
      assert.equal("integer", math.type(h.vars.lab_http_port))
      assert.equal("integer", math.type(h.vars.lab_https_port))
    end
    assert.equal(2, #lab_containers())
  end)

  it("lets the lab key in as root with strict host-key checking", function()
    local inv = inventory()
    local ports = {}
    for _, name in ipairs({ "kgtest-1", "kgtest-2" }) do
      local s <close> = assert(connect(inv, name))
      assert.equal(name .. "\n", assert(s:exec("hostname")).stdout)
      assert.equal("0\n", assert(s:exec("id -u")).stdout)
      ports[#ports + 1] = inv.hosts[name].port
    end
    -- one known_hosts line per host, each its own key
    local lines = {}
    for line in assert(k.read_file(inv.ssh.known_hosts)):gmatch("[^\n]+") do lines[#lines + 1] = line end
    assert.equal(2, #lines)
    assert.matches("^%[127%.0%.0%.1%]:" .. ports[1] .. " ssh%-ed25519 ", lines[1])
    assert.matches("^%[127%.0%.0%.1%]:" .. ports[2] .. " ssh%-ed25519 ", lines[2])
    assert.not_equal(lines[1]:match("%S+$"), lines[2]:match("%S+$"))
  end)

  it("refuses a host whose key is not the recorded one", function()
    local inv = inventory()
    local other = H.tmpdir("kh") .. "/known_hosts"
    -- kgtest-2's key recorded for kgtest-1's port
    local kh = assert(k.read_file(inv.ssh.known_hosts))
    local key2 = kh:match("%]:" .. inv.hosts["kgtest-2"].port .. " (ssh%-ed25519 %S+)")
    assert(k.write_file(other, "[127.0.0.1]:" .. inv.hosts["kgtest-1"].port .. " " .. key2 .. "\n"))
    local s, err, code = connect(inv, "kgtest-1", { known_hosts = other })
    assert.is_nil(s)
    assert.equal("EHOSTKEY", code, err)
  end)

  it("publishes SSH, HTTP and HTTPS on 127.0.0.1 only", function()
    for _, name in ipairs({ "kgtest-1", "kgtest-2" }) do
      local info = assert(d:container_inspect(name))
      for _, port in ipairs({ "22/tcp", "80/tcp", "443/tcp" }) do
        local bound = info.NetworkSettings.Ports[port]
        assert.is_table(bound, port)
        assert(#bound >= 1, port)
        for _, b in ipairs(bound) do assert.equal("127.0.0.1", b.HostIp) end
      end
      local ports = info.NetworkSettings.Ports
      local inv = inventory()
      assert.equal(inv.hosts[name].port, tonumber(ports["22/tcp"][1].HostPort))
      assert.equal(inv.hosts[name].vars.lab_http_port, tonumber(ports["80/tcp"][1].HostPort))
      assert.equal(inv.hosts[name].vars.lab_https_port, tonumber(ports["443/tcp"][1].HostPort))
    end
  end)

  it("gives each host what Docker inside it needs (DESIGN: not --privileged)", function()
    local info = assert(d:container_inspect("kgtest-1"))
    local hc = info.HostConfig
    assert.is_false(hc.Privileged)
    local caps = {}
    for _, c in ipairs(hc.CapAdd) do caps[c:gsub("^CAP_", "")] = true end
    for _, c in ipairs({ "SYS_ADMIN", "NET_ADMIN", "NET_RAW", "MKNOD", "SYS_CHROOT", "SETFCAP", "AUDIT_WRITE",
                         "SYS_PTRACE", "SYS_MODULE", "DAC_READ_SEARCH", "IPC_LOCK", "SYS_NICE" }) do
      assert.is_true(caps[c], c)
    end
    local secopt = table.concat(hc.SecurityOpt, " ")
    assert.matches("seccomp=unconfined", secopt)
    assert.matches("apparmor=unconfined", secopt)
    assert.same({ "/sys/fs/cgroup:/sys/fs/cgroup:rw" }, hc.Binds)
    assert.is_string(hc.Tmpfs["/var/lib/docker"])
    -- and inside: the tmpfs allows exec, the cgroup tree is writable
    local s <close> = assert(connect(inventory(), "kgtest-1"))
    local r = assert(s:exec("grep ' /var/lib/docker tmpfs ' /proc/mounts; grep -c ' /sys/fs/cgroup/' /proc/mounts"))
    assert.equal(0, r.code, r.stderr)
    assert.not_matches("noexec", r.stdout)
    assert.matches("^/?%S* /var/lib/docker tmpfs rw", r.stdout)
    r = assert(s:exec("grep ' /sys/fs/cgroup' /proc/mounts | grep -v ' rw' || true"))
    assert.equal("", r.stdout)
  end)

  it("runs commands through the Docker API too (exec)", function()
    local r = assert(d:exec("kgtest-2", { "sh", "-c", "hostname; echo oops >&2; exit 3" }))
    assert.same({ code = 3, stdout = "kgtest-2\n", stderr = "oops\n" }, r)
  end)

  it("`lab status`, `lab ssh` and `lab inventory`", function()
    local r = kengine_lab({ "status", "--name", LAB })
    assert.equal(0, r.code, r.stderr)
    local inv = inventory()
    assert.matches("kgtest%-1%s+running%s+" .. inv.hosts["kgtest-1"].port .. "%s+"
      .. inv.hosts["kgtest-1"].vars.lab_http_port, r.stdout)
    assert.matches("kgtest%-2%s+running%s+" .. inv.hosts["kgtest-2"].port, r.stdout)

    r = kengine_lab({ "ssh", "kgtest-2", "--name", LAB, "--", "hostname", "&&", "id", "-un" })
    assert.equal(0, r.code, r.stderr)
    assert.equal("kgtest-2\nroot\n", r.stdout)
    r = kengine_lab({ "ssh", "1", "--name", LAB, "--", "exit 7" })
    assert.equal(7, r.code)

    r = kengine_lab({ "inventory", "--name", LAB })
    assert.equal(0, r.code)
    assert.equal(labdir .. "/kgtest/inventory.lua\n", r.stdout)
  end)

  it("`lab up` again keeps the hosts; a smaller N removes the rest", function()
    local before = assert(d:container_inspect("kgtest-1")).Id
    local r = kengine_lab({ "up", "2", "--name", LAB })
    assert.equal(0, r.code, r.stderr)
    assert.equal(before, assert(d:container_inspect("kgtest-1")).Id)
    local s <close> = assert(connect(inventory(), "kgtest-2"))
    s:close()

    r = kengine_lab({ "up", "1", "--name", LAB })
    assert.equal(0, r.code, r.stderr)
    assert.equal(1, #lab_containers())
    local inv = inventory()
    assert.same({ "kgtest-1" }, inv.groups.lab.hosts)
    assert.is_nil(inv.hosts["kgtest-2"])
    local _, _, code = d:container_inspect("kgtest-2")
    assert.equal("ENOTFOUND", code)
  end)

  it("`lab down` removes containers, keys and files, and is safe to run twice", function()
    local r = kengine_lab({ "down", "--name", LAB })
    assert.equal(0, r.code, r.stderr)
    assert.equal("lab 'kgtest': removed 1 host and its files\n", r.stdout)
    assert.equal(0, #lab_containers())
    assert.is_nil(k.read_file(labdir .. "/kgtest/id_ed25519"))
    assert.is_nil(k.read_file(labdir .. "/kgtest/inventory.lua"))
    assert.equal(1, assert(k.exec({ "test", "-e", labdir .. "/kgtest" })).code)

    r = kengine_lab({ "down", "--name", LAB })
    assert.equal(0, r.code, r.stderr)
    assert.equal("lab 'kgtest': no hosts to remove; files removed\n", r.stdout)
    r = kengine_lab({ "status", "--name", LAB })
    assert.equal(1, r.code)
    assert.equal("kengine lab: lab 'kgtest' has no hosts (start it: kengine lab up --name kgtest)\n", r.stderr)
  end)
end)

describe("kengine lab image --from", function()
  local derived = "kengine-lab:kgtest-from"

  setup(function()
    labdir = H.tmpdir("labs")
    env = { KENGINE_LAB_DIR = labdir }
    d:image_remove(derived, { force = true })
  end)

  teardown(function()
    kengine_lab({ "down", "--name", "kgtest-from" })
    d:image_remove(derived, { force = true })
  end)

  -- no registry here, so the base is the local lab image: this exercises the
  -- container + exec + commit path that a pulled `debian` base goes through
  it("builds a lab image from a base image that hosts start from", function()
    local r = kengine_lab({ "image", "--from", IMAGE, "--image", derived }, nil, 600)
    assert.equal(0, r.code, r.stdout .. r.stderr)
    assert.matches("built " .. derived:gsub("%p", "%%%0"), r.stdout)
    local info = assert(d:image_inspect(derived))
    assert.same({ "/usr/local/sbin/kengine-lab-init" }, info.Config.Cmd)
    assert.same({}, assert(d:containers { all = true, labels = { "io.kengine.lab.build" } }))

    r = kengine_lab({ "up", "--name", "kgtest-from", "--image", derived })
    assert.equal(0, r.code, r.stderr)
    r = kengine_lab({ "ssh", "kgtest-from-1", "--name", "kgtest-from", "--", "ls /etc/ssh/ssh_host_*" })
    assert.equal("/etc/ssh/ssh_host_ed25519_key\n/etc/ssh/ssh_host_ed25519_key.pub\n", r.stdout)
  end)
end)

describe("kengine lab errors", function()
  setup(function()
    labdir = H.tmpdir("labs")
    env = { KENGINE_LAB_DIR = labdir }
  end)

  it("says to build the image when it is missing", function()
    local r = kengine_lab({ "up", "--name", "kgtest-noimage" }, { KENGINE_LAB_IMAGE = "kengine-lab:no-such-tag" })
    assert.equal(1, r.code)
    assert.equal("kengine lab: image kengine-lab:no-such-tag not found: run `kengine lab image` first\n", r.stderr)
    r = kengine_lab({ "up", "--name", "kgtest-noimage", "--image", "kengine-lab:no-such-tag" })
    assert.equal("kengine lab: image kengine-lab:no-such-tag not found: run `kengine lab image` first\n", r.stderr)
    assert.equal(0, #lab_containers("kgtest-noimage"))
  end)

  it("says Docker is not running when nothing answers on the socket", function()
    local dir = H.tmpdir("sock")
    local r = kengine_lab({ "status" }, { DOCKER_HOST = "unix://" .. dir .. "/docker.sock" })
    assert.equal(1, r.code)
    assert.equal("kengine lab: Docker is not running: no socket at " .. dir .. "/docker.sock (start it: "
      .. "`service docker start`, or tests/support/dockerd.sh in a source tree)\n", r.stderr)
    -- a file that is not a listening socket refuses connections
    assert(k.write_file(dir .. "/docker.sock", ""))
    r = kengine_lab({ "up" }, { DOCKER_HOST = "unix://" .. dir .. "/docker.sock" })
    assert.equal(1, r.code)
    assert.matches("^kengine lab: Docker is not running: nothing answers on " .. dir:gsub("%p", "%%%0"), r.stderr)
  end)

  it("exits 2 on usage errors", function()
    assert.equal(2, kengine_lab({ "frobnicate" }).code)
    assert.equal(2, kengine_lab({ "up", "zero" }).code)
    assert.equal(2, kengine_lab({ "up", "0" }).code)
    assert.equal(2, kengine_lab({ "up", "--name", "Bad Name" }).code)
    assert.equal(2, kengine_lab({ "status", "--bogus" }).code)
    local r = kengine_lab({ "ssh" })
    assert.equal(2, r.code)
    assert.equal("kengine lab: ssh: missing HOST\nTry 'kengine lab --help'.\n", r.stderr)
  end)
end)

describe("kengine.docker pieces", function()
  it("writes tar archives that tar reads back", function()
    local dir = H.tmpdir("tar")
    local t = docker.tar {
      { name = "etc/ssh", dir = true, mode = "0700" },
      { name = "etc/ssh/key", content = "secret\n", mode = "0600" },
      { name = "empty", content = "" },
      { name = "big", content = ("x"):rep(1500) },
    }
    assert.equal(0, #t % 512)
    assert(k.write_file(dir .. "/a.tar", t))
    local r = assert(k.exec({ "tar", "-tvf", dir .. "/a.tar" }))
    assert.equal(0, r.code, r.stderr)
    assert.matches("drwx%-%-%-%-%-%- root/root%s+0 .- etc/ssh/\n", r.stdout)
    assert.matches("%-rw%-%-%-%-%-%-%- root/root%s+7 .- etc/ssh/key\n", r.stdout)
    assert.matches("root/root%s+1500 .- big\n", r.stdout)
    assert.equal(0, assert(k.exec({ "tar", "-xf", dir .. "/a.tar", "-C", dir })).code)
    assert.equal("secret\n", k.read_file(dir .. "/etc/ssh/key"))
  end)

  it("splits Docker's multiplexed exec stream", function()
    local frame = function(kind, s) return string.pack(">B xxx I4", kind, #s) .. s end
    assert.same({ "out1out2", "err" }, { docker.demux(frame(1, "out1") .. frame(2, "err") .. frame(1, "out2")) })
    assert.same({ "", "" }, { docker.demux("") })
  end)

  it("encodes queries", function()
    assert.equal("?changes=CMD%20%5B%22%2Fx%22%5D&changes=EXPOSE%2022&fromSrc=-&repo=a",
      docker.query { fromSrc = "-", repo = "a", changes = { 'CMD ["/x"]', "EXPOSE 22" } })
    assert.equal("", docker.query {})
  end)
end)

describe("kengine lab apt sources", function()
  it("reads deb822 .sources: continuation lines, comments, Enabled: no", function()
    local entries = lab.parse_deb822([[
Types: deb deb-src
# a comment inside the paragraph
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main contrib
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://security.example/debian-security
Suites: bookworm-security
Components: main

Enabled: no
Types: deb
URIs: http://disabled.example/debian
Suites: bookworm
Components: main
]])
    assert.equal(2, #entries)
    assert.same({ "deb", "deb-src" }, entries[1].types)
    assert.same({ "bookworm", "bookworm-updates" }, entries[1].suites)
    local src = assert(lab.debian_sources("bookworm", entries))
    assert.equal("http://mirror.example/debian", src.mirror)
    assert.same({ "main", "contrib" }, src.components)
    assert.same({ { uri = "http://mirror.example/debian", suite = "bookworm-updates", components = { "main", "contrib" } },
                  { uri = "http://security.example/debian-security", suite = "bookworm-security",
                    components = { "main" } } }, src.extra)
  end)

  it("reads one-line sources.list and skips other repositories", function()
    local entries = lab.parse_sources_list([[
# deb http://commented.example/debian bookworm main
deb [arch=amd64 signed-by=/x.gpg] https://vendor.example/linux/debian bookworm stable
deb-src http://mirror.example/debian bookworm main
deb http://mirror.example/debian/ bookworm main non-free-firmware
]])
    assert.equal(3, #entries)
    local src = assert(lab.debian_sources("bookworm", entries))
    assert.equal("http://mirror.example/debian", src.mirror)
    local none, err = lab.debian_sources("trixie", entries)
    assert.is_nil(none)
    assert.matches("no Debian mirror for 'trixie'", err)
  end)
end)
