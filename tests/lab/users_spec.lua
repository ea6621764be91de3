-- user, group and authorized_keys against a real Debian lab host.  State is
-- checked with getent/id/stat over a separate SSH session, and a key is proven
-- by logging in as the user over SSH.
local k = require "kengine"
local H = require "helpers"

local HOST, S, LAB, PUB

-- a throwaway public key (not the lab's) for the authorized_keys tests
local OTHER = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBqzBWWdOLBHOLxr5ZDbLSbnwmEPxVlcn5cPEJuXdPkg other@kgu"
local THIRD = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHZ0Kq4Fq8+GAc2uCJ0k2Q9bHBC8tYQbyn1CfxkvJbUa third@kgu"
-- crypt(3) hashes (SHA-512) of throwaway passwords
local HASH1 = "$6$kgusalt1$Ibh1IZPpN/ZCg8Ss2qXn4Y3Ku2/mmN2E8sqgv5S6Tgx8Vbn5lI8qUD2.s64rVYHkJMQR4DWxGLnOxTgUFBXiK1"
local HASH2 = "$6$kgusalt2$QkA7wyjL2m1C0yjbWcqJ2UQ6V5W0zBBbkGoSqR3u1Yk4yZfRTb1K5Zyk0tqcWgXSXWgd2aAXPj1XGz2Gpmm8n."





local kit = H.lab_kit(function() return HOST, S end)
local sh, recipe, run, converge = kit.sh, kit.recipe, kit.run, kit.converge
local function gone(user)
  sh("userdel -r " .. user .. " 2>/dev/null; groupdel " .. user .. " 2>/dev/null; true")
end

local function login_as(user)
  local hv = LAB.hosts[HOST]
  return k.ssh.connect { host = hv.host, port = hv.port, user = user, identity = LAB.ssh.identity,
    known_hosts = LAB.ssh.known_hosts, config = false, agent = false, timeout = 20 }
end

describe("user and group on a lab host", function()
  setup(function()
    LAB = H.lab()
    HOST = LAB.name .. "-2"
    S = H.lab_connect(HOST)
    PUB = (assert(k.read_file(LAB.ssh.identity .. ".pub")):gsub("%s+$", ""))
    for _, u in ipairs({ "kgu-alice", "kgu-bob", "kgu-carol", "kgu-dave", "kgu-erin" }) do gone(u) end
    sh("for g in kgu-dev kgu-ops kgu-web kgu-sys; do groupdel $g 2>/dev/null; done; true")
  end)

  teardown(function()
    if not S then return end
    for _, u in ipairs({ "kgu-alice", "kgu-bob", "kgu-carol", "kgu-dave", "kgu-erin" }) do gone(u) end
    sh("for g in kgu-dev kgu-ops kgu-web kgu-sys; do groupdel $g 2>/dev/null; done; true", true)
    S:close()
  end)

  it("group: created with a gid and as a system group, gid changed, removed", function()
    local path = recipe [[
      h:group { name = "kgu-dev", gid = 23450 }
      h:group { name = "kgu-sys", system = true }
    ]]
    converge(path, 2, function()
      assert.equal(2, select(2, sh("getent group kgu-dev", true)))
    end)
    assert.equal("kgu-dev:x:23450:\n", sh("getent group kgu-dev"))
    assert.is_true(tonumber((sh("getent group kgu-sys | cut -d: -f3"))) < 1000)

    local re = run(recipe [[ h:group { name = "kgu-dev", gid = 23451 } ]])
    assert.equal(1, re.recap.changed, re.out)
    assert.matches("gid 23450 → 23451", re.steps[1].msg, 1, true)
    assert.same({ 23450, 23451 }, re.steps[1].changes.gid)
    assert.equal("23451\n", sh("getent group kgu-dev | cut -d: -f3"))

    converge(recipe [[ h:group { name = "kgu-sys", state = "absent" } ]], 1)
    assert.equal(2, select(2, sh("getent group kgu-sys", true)))
  end)

  it("user: uid, groups, shell, home, password hash (a secret), keys; check changes nothing", function()
    local path = recipe(string.format([[
      h:group { name = "kgu-ops" }
      h:group { name = "kgu-web" }
      h:user { name = "kgu-alice", uid = 23401, groups = { "kgu-ops", "kgu-web" }, shell = "/bin/bash",
               home = "/srv/kgu-alice", password = k.secret(%q), authorized_keys = { %q } }
    ]], HASH1, PUB))
    local c = converge(path, 3, function()
      assert.equal(2, select(2, sh("getent passwd kgu-alice", true)))
    end)
    assert.matches("create user, authorized_keys", c.out, 1, true)
    assert.matches("+" .. PUB, c.out, 1, true)
    assert.equal("kgu-alice:x:23401:23401::/srv/kgu-alice:/bin/bash\n", sh("getent passwd kgu-alice"))
    assert.equal("kgu-alice kgu-ops kgu-web\n", sh("id -Gn kgu-alice"))
    assert.equal(HASH1 .. "\n", sh("getent shadow kgu-alice | cut -d: -f2"))
    assert.equal("700 kgu-alice kgu-alice\n600 kgu-alice kgu-alice\n",
      sh("stat -c '%a %U %G' /srv/kgu-alice/.ssh /srv/kgu-alice/.ssh/authorized_keys"))
    assert.equal(PUB .. "\n", sh("cat /srv/kgu-alice/.ssh/authorized_keys"))
    -- the key logs in, so sshd accepts the modes and owners
    local s = assert(login_as("kgu-alice"))
    assert.equal("kgu-alice\n", assert(s:exec("id -un")).stdout)
    s:close()
  end)

  it("user: the hash travels on stdin only and is never shown, even with -v", function()
    local path = recipe(string.format([[ h:user { name = "kgu-bob", password = %q, create_home = false } ]], HASH1))
    local r = run(path, "-v")
    assert.equal(0, r.code, r.out)
    assert.equal(1, r.recap.changed)
    assert.matches("chpasswd -e", r.out, 1, true)
    assert.is_nil(r.out:find(HASH1, 1, true))
    assert.is_nil(r.out:find("kgusalt1", 1, true))
    assert.equal(HASH1 .. "\n", sh("getent shadow kgu-bob | cut -d: -f2"))
    assert.equal(1, select(2, sh("test -e /home/kgu-bob", true)))

    -- a new hash is a change of the password field only
    local re = run(recipe(string.format([[ h:user { name = "kgu-bob", password = k.secret(%q) } ]], HASH2)), "-v")
    assert.equal(1, re.recap.changed, re.out)
    assert.equal("password", re.steps[1].msg)
    assert.same({ password = true }, re.steps[1].changes)
    assert.is_nil(re.out:find("kgusalt2", 1, true))
    assert.equal(HASH2 .. "\n", sh("getent shadow kgu-bob | cut -d: -f2"))
    assert.equal(0, run(recipe(string.format([[ h:user { name = "kgu-bob", password = %q } ]], HASH2))).recap.changed)

    local plain = run(recipe [[ h:user { name = "kgu-bob", password = "hunter2" } ]])
    assert.equal(1, plain.code)
    assert.matches("user: password must be a crypt(3) hash", plain.out, 1, true)
    assert.is_nil(plain.out:find("hunter2", 1, true))
    assert.equal(HASH2 .. "\n", sh("getent shadow kgu-bob | cut -d: -f2"))
  end)

  it("user: groups appended by default, exact with append = false; diffs list the fields", function()
    sh("groupadd -f kgu-dev; groupadd -f kgu-ops; groupadd -f kgu-web")
    sh("useradd -m -s /bin/sh -G kgu-dev,kgu-ops kgu-carol")
    local append = recipe [[ h:user { name = "kgu-carol", groups = { "kgu-web" }, shell = "/bin/bash" } ]]
    local c = converge(append, 1, function()
      assert.equal("kgu-carol kgu-dev kgu-ops\n", sh("id -Gn kgu-carol"))
    end)
    local step = c.steps[1]
    assert.equal("groups +kgu-web, shell /bin/sh → /bin/bash", step.msg)
    assert.same({ "/bin/sh", "/bin/bash" }, step.changes.shell)
    assert.same({ "kgu-web" }, step.changes.groups.added)
    assert.equal("kgu-carol kgu-dev kgu-ops kgu-web\n", sh("id -Gn kgu-carol"))
    assert.equal("/bin/bash\n", sh("getent passwd kgu-carol | cut -d: -f7"))

    local exact = recipe [[ h:user { name = "kgu-carol", groups = { "kgu-ops" }, append = false, uid = 23420 } ]]
    local e = converge(exact, 1)
    assert.matches("groups -kgu-dev -kgu-web", e.steps[1].msg, 1, true)
    assert.matches("uid %d+ → 23420", e.steps[1].msg)
    assert.equal("kgu-carol kgu-ops\n", sh("id -Gn kgu-carol"))
    assert.equal("23420\n", sh("id -u kgu-carol"))
    assert.equal("kgu-carol\n", sh("stat -c %U /home/kgu-carol/.profile"))

    local missing = run(recipe [[ h:user { name = "kgu-carol", groups = { "kgu-nosuchgroup" } } ]])
    assert.equal(1, missing.code)
    assert.matches("group 'kgu-nosuchgroup' does not exist", missing.out, 1, true)
  end)

  it("authorized_keys: missing keys added, others kept; exclusive replaces the file", function()
    sh("useradd -m -s /bin/sh kgu-dave && mkdir -m 0755 /home/kgu-dave/.ssh && " ..
      "printf '%s\\n' '" .. OTHER .. "' > /home/kgu-dave/.ssh/authorized_keys && " ..
      "chmod 0644 /home/kgu-dave/.ssh/authorized_keys")
    local add = recipe(string.format([[
      h:user { name = "kgu-dave", authorized_keys = { %q, %q } }
    ]], PUB, OTHER:gsub("other@kgu", "renamed-comment")))
    local c = converge(add, 1, function()
      assert.equal(OTHER .. "\n", sh("cat /home/kgu-dave/.ssh/authorized_keys"))
    end)
    assert.matches("+" .. PUB, c.out, 1, true)
    assert.equal(OTHER .. "\n" .. PUB .. "\n", sh("cat /home/kgu-dave/.ssh/authorized_keys"))
    assert.equal("700 kgu-dave kgu-dave\n600 kgu-dave kgu-dave\n",
      sh("stat -c '%a %U %G' /home/kgu-dave/.ssh /home/kgu-dave/.ssh/authorized_keys"))
    local s = assert(login_as("kgu-dave"))
    s:close()

    -- wrong modes alone are a change, and get fixed
    sh("chmod 0644 /home/kgu-dave/.ssh/authorized_keys")
    local m = run(add)
    assert.equal(1, m.recap.changed, m.out)
    assert.equal("600\n", sh("stat -c %a /home/kgu-dave/.ssh/authorized_keys"))

    local excl = recipe(string.format([[
      h:user { name = "kgu-dave", authorized_keys = { %q, %q }, authorized_keys_exclusive = true }
    ]], THIRD, PUB))
    local e = converge(excl, 1)
    assert.matches("-" .. OTHER, e.out, 1, true)
    assert.equal(THIRD .. "\n" .. PUB .. "\n", sh("cat /home/kgu-dave/.ssh/authorized_keys"))

    local none = recipe [[ h:user { name = "kgu-dave", authorized_keys = {}, authorized_keys_exclusive = true } ]]
    converge(none, 1)
    assert.equal("", sh("cat /home/kgu-dave/.ssh/authorized_keys"))
    local _, err, code = login_as("kgu-dave")
    assert.equal("EAUTH", code, err)
  end)

  it("user: system user without a home; absent, with remove = true taking the home", function()
    local sys = recipe [[ h:user { name = "kgu-erin", system = true, create_home = false, shell = "/usr/sbin/nologin" } ]]
    converge(sys, 1)
    assert.is_true(tonumber((sh("id -u kgu-erin"))) < 1000)
    assert.equal(1, select(2, sh("test -e /home/kgu-erin", true)))

    converge(recipe [[ h:user { name = "kgu-erin", state = "absent" } ]], 1, function()
      assert.equal(0, select(2, sh("id kgu-erin", true)))
    end)
    assert.equal(1, select(2, sh("id kgu-erin", true)))

    sh("useradd -m kgu-erin && touch /home/kgu-erin/data")
    converge(recipe [[ h:user { name = "kgu-erin", state = "absent", remove = true } ]], 1)
    assert.equal(1, select(2, sh("test -e /home/kgu-erin", true)))
  end)
end)
