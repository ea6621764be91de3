-- sshd: the hardening drop-in against the lab host's real sshd (a child of
-- docker-init, reloaded with SIGHUP).  Every check is made directly: the file
-- over a separate SSH session, `sshd -T`, and NEW SSH connections after the
-- reload (as root, and as a test user whom DenyUsers shuts out).
local k = require "kengine"
local H = require "helpers"

local HOST, S, LAB
local DROPIN = "/etc/ssh/sshd_config.d/50-kengine.conf"
local EARLY = "/etc/ssh/sshd_config.d/10-kgs-early.conf"
local BAD = "/etc/ssh/sshd_config.d/40-kgs-bad.conf"

local HARDENING = [[
  PasswordAuthentication = "no", PermitRootLogin = "prohibit-password", KbdInteractiveAuthentication = false,
  Ciphers = { "chacha20-poly1305@openssh.com", "aes256-gcm@openssh.com" }, MaxAuthTries = 4,
]]
local HARDENED = "# Managed by kengine (h:sshd): local changes are overwritten.\n" ..
  "Ciphers chacha20-poly1305@openssh.com,aes256-gcm@openssh.com\nKbdInteractiveAuthentication no\n" ..
  "MaxAuthTries 4\nPasswordAuthentication no\nPermitRootLogin prohibit-password\n"




local kit = H.lab_kit(function() return HOST, S end)
local sh, recipe, run = kit.sh, kit.recipe, kit.run
local function sshd(settings, extra)
  return recipe("h:sshd { settings = { " .. settings .. " }" .. (extra and (", " .. extra) or "") .. " }")
end

local function login_as(user)
  local hv = LAB.hosts[HOST]
  return k.ssh.connect { host = hv.host, port = hv.port, user = user, identity = LAB.ssh.identity,
    known_hosts = LAB.ssh.known_hosts, config = false, agent = false, timeout = 20 }
end

-- a brand-new root connection works and runs a command
local function new_root_login_works()
  local s = H.lab_connect(HOST)
  assert.equal("root\n", assert(s:exec("id -un")).stdout)
  s:close()
end

local function effective(key)
  return (sh("sshd -T -C user=root,host=localhost,addr=127.0.0.1 | awk '$1 == \"" .. key .. "\" { print $2 }'"))
end

-- after a SIGHUP sent by the test itself: wait until sshd accepts logins again
local function wait_sshd()
  local last
  for _ = 1, 40 do
    local s, err = login_as("root")
    if s then s:close(); return end
    last = err
    k.sleep(0.25)
  end
  error("sshd did not come back: " .. tostring(last))
end

local function reset()
  sh("rm -f " .. DROPIN .. " " .. EARLY .. " " .. BAD .. " && sshd -t && kill -HUP $(cat /run/sshd.pid)")
  wait_sshd()
end

describe("sshd drop-in on a lab host", function()
  setup(function()
    LAB = H.lab()
    HOST = LAB.name .. "-3"
    S = H.lab_connect(HOST)
    reset()
    sh("userdel -r kgs-user 2>/dev/null; useradd -m -s /bin/sh kgs-user && install -d -m 0700 -o kgs-user " ..
      "-g kgs-user /home/kgs-user/.ssh && install -m 0600 -o kgs-user -g kgs-user /root/.ssh/authorized_keys " ..
      "/home/kgs-user/.ssh/authorized_keys")
  end)

  teardown(function()
    if not S then return end
    reset()
    sh("userdel -r kgs-user 2>/dev/null; true", true)
    S:close()
  end)

  it("writes the hardening drop-in, validated and reloaded; check changes nothing; converges", function()
    local path = sshd(HARDENING)
    local c = run(path, "--check", "--diff")
    assert.equal(0, c.code, c.out)
    assert.equal(1, c.recap.changed, c.out)
    assert.matches("+PasswordAuthentication no", c.out, 1, true)
    assert.equal(1, select(2, sh("test -e " .. DROPIN, true)))

    local r = run(path, "--diff")
    assert.equal(0, r.code, r.out)
    assert.equal(1, r.recap.changed, r.out)
    assert.matches("+Ciphers chacha20-poly1305@openssh.com,aes256-gcm@openssh.com", r.out, 1, true)
    assert.matches("validated, reloaded %(kill %-HUP %d+%), new connection ok", r.steps[1].msg)
    assert.equal(HARDENED, sh("cat " .. DROPIN))
    assert.equal("644 root\n", sh("stat -c '%a %U' " .. DROPIN))
    assert.equal("no\n", effective("passwordauthentication"))
    assert.equal("without-password\n", effective("permitrootlogin"))
    assert.equal("4\n", effective("maxauthtries"))
    assert.equal("chacha20-poly1305@openssh.com,aes256-gcm@openssh.com\n", effective("ciphers"))
    new_root_login_works()

    local again = run(path)
    assert.equal(0, again.code, again.out)
    assert.equal(0, again.recap.changed, again.out)
  end)

  it("the reload takes effect: DenyUsers shuts a user out of new logins, root still gets in", function()
    local s = assert(login_as("kgs-user"))
    s:close()
    local deny = run(sshd(HARDENING .. ' DenyUsers = "kgs-user"'), "--diff")
    assert.equal(0, deny.code, deny.out)
    assert.equal(1, deny.recap.changed, deny.out)
    assert.matches("settings: DenyUsers;", deny.steps[1].msg, 1, true)
    assert.same({ "", "kgs-user" }, deny.steps[1].changes.DenyUsers)
    assert.matches("+DenyUsers kgs-user", deny.out, 1, true)
    local _, err, code = login_as("kgs-user")
    assert.equal("EAUTH", code, err)
    new_root_login_works()

    local back = run(sshd(HARDENING))
    assert.equal(1, back.recap.changed, back.out)
    s = assert(login_as("kgs-user"))
    s:close()
  end)

  it("a config that fails `sshd -t` is not applied: the old file stays, a new one is removed", function()
    run(sshd(HARDENING))
    local before = sh("cat " .. DROPIN)
    local r = run(sshd('Ciphers = "nonsense-cipher"'))
    assert.equal(1, r.code)
    assert.equal(1, r.recap.failed)
    assert.matches("`sshd -t` rejects the config with this " .. DROPIN .. ", so it was not applied " ..
      "(the previous file was restored)", r.out, 1, true)
    assert.matches("Bad SSH2 cipher spec 'nonsense-cipher'", r.out, 1, true)
    assert.equal(before, sh("cat " .. DROPIN))
    sh("sshd -t")
    new_root_login_works()

    local new = run(sshd('Ciphers = "nonsense-cipher"', "path = " .. string.format("%q", BAD)))
    assert.equal(1, new.code)
    assert.matches("(the new file was removed)", new.out, 1, true)
    assert.equal(1, select(2, sh("test -e " .. BAD, true)))
  end)

  it("refuses a config that would lock out kengine's user, and changes nothing", function()
    run(sshd(HARDENING))
    local before = sh("cat " .. DROPIN)
    local cases = {
      { 'PermitRootLogin = "no"', "PermitRootLogin no would refuse root, the user kengine is connected as" },
      { 'AllowUsers = "kgs-user"', "AllowUsers does not include root, the user kengine is connected as" },
      { 'AllowUsers = "root@203.0.113.0/24"', "AllowUsers does not include root" },
      { "PubkeyAuthentication = false", "PubkeyAuthentication no would refuse the key kengine is connected with" },
      { 'PasswordAuthentication = true, AuthenticationMethods = "publickey,password"',
        "AuthenticationMethods publickey,password needs more" },
    }
    for _, case in ipairs(cases) do
      local r = run(sshd(case[1]))
      assert.equal(1, r.code, r.out)
      assert.matches("sshd: refused: the config with this " .. DROPIN .. " would lock out root (kengine's login): ",
        r.out, 1, true)
      assert.matches(case[2], r.out, 1, true)
      assert.matches("nothing was changed", r.out, 1, true)
      assert.equal(before, sh("cat " .. DROPIN))
    end
    -- allowed: root in AllowUsers by pattern
    local ok = run(sshd(HARDENING .. ' AllowUsers = { "r??t", "kgs-user" }'))
    assert.equal(0, ok.code, ok.out)
    assert.equal("AllowUsers r??t\nAllowUsers kgs-user\n", sh("grep AllowUsers " .. DROPIN))
    new_root_login_works()
    run(sshd(HARDENING))
  end)

  it("rolls back a config that passes `sshd -t` but breaks new connections after the reload", function()
    run(sshd(HARDENING))
    local before = sh("cat " .. DROPIN)
    -- OpenSSH still accepts group1-sha1; kengine's libssh does not offer it, so a new connection fails
    local r = run(sshd('KexAlgorithms = "diffie-hellman-group1-sha1"'))
    assert.equal(1, r.code, r.out)
    assert.matches("sshd: a new SSH connection failed after the reload %(EPROTO: .*kex.*%); the previous config " ..
      "was put back and sshd reloaded", r.out)
    assert.equal(before, sh("cat " .. DROPIN))
    new_root_login_works()
  end)

  it("refuses settings that an earlier file overrides, and a main config without the Include", function()
    run(sshd(HARDENING))
    local before = sh("cat " .. DROPIN)
    sh("printf 'MaxAuthTries 6\\n' > " .. EARLY)
    local r = run(sshd((HARDENING:gsub("MaxAuthTries = 4", "MaxAuthTries = 3"))))
    sh("rm -f " .. EARLY)
    assert.equal(1, r.code, r.out)
    assert.matches("would not take effect because an earlier file or line sets them", r.out, 1, true)
    assert.matches("MaxAuthTries (effective: 6)", r.out, 1, true)
    assert.equal(before, sh("cat " .. DROPIN))

    sh("printf 'Port 22\\n' > /tmp/kgs-main.conf")
    local inc = run(sshd(HARDENING, 'main_config = "/tmp/kgs-main.conf"'))
    sh("rm -f /tmp/kgs-main.conf")
    assert.equal(1, inc.code)
    assert.matches("/tmp/kgs-main.conf has no Include matching " .. DROPIN, inc.out, 1, true)
  end)

  it("as a sudo user logged in with a password: password logins may not be disabled", function()
    local PW_CONF = "/etc/ssh/sshd_config.d/60-kgs-pw.conf"
    reset()
    -- 60-kgs-pw.conf sorts after 50-kengine.conf and before the lab's kengine-lab.conf
    sh("printf 'PasswordAuthentication yes\\n' > " .. PW_CONF .. " && kill -HUP $(cat /run/sshd.pid) && " ..
      "userdel -r kgs-pw 2>/dev/null; useradd -m -s /bin/sh kgs-pw && echo 'kgs-pw:Kgs-pw-9f3e' | chpasswd && " ..
      "echo 'kgs-pw ALL=(ALL) NOPASSWD:ALL' > /etc/sudoers.d/kgs-pw")
    wait_sshd()
    local hv = LAB.hosts[HOST]
    local inv = H.tmpdir("pwinv") .. "/inventory.lua"
    assert(k.write_file(inv, string.format("return { hosts = { [%q] = { host = %q, port = %d, user = 'kgs-pw' } },\n" ..
      "  ssh = { password = 'Kgs-pw-9f3e', known_hosts = %q, host_key = 'strict', agent = false, sudo = true } }\n",
      HOST, hv.host, hv.port, LAB.ssh.known_hosts)))
    local function pw_run(path)
      local json = H.tmpdir("pwev") .. "/events.json"
      local r = H.kengine({ "run", path, "-i", inv, "--json", json })
      local events = {}
      for line in (k.read_file(json) or ""):gmatch("[^\n]+") do events[#events + 1] = assert(k.json.decode(line)) end
      return { code = r.code, out = r.stdout .. r.stderr, recap = (H.recap(events) or {})[HOST] or {} }
    end
    local ok, err = pcall(function()
      local refused = pw_run(sshd('PasswordAuthentication = "no"'))
      assert.equal(1, refused.code, refused.out)
      assert.matches("would lock out kgs-pw (kengine's login): PasswordAuthentication no would refuse the password " ..
        "kengine is connected with", refused.out, 1, true)
      assert.equal(1, select(2, sh("test -e " .. DROPIN, true)))

      local applied = pw_run(sshd("MaxAuthTries = 5"))
      assert.equal(0, applied.code, applied.out)
      assert.equal(1, applied.recap.changed, applied.out)
      assert.matches("new connection ok", applied.out, 1, true)
      assert.equal("5\n", effective("maxauthtries"))
    end)
    sh("rm -f " .. PW_CONF .. " /etc/sudoers.d/kgs-pw; userdel -r kgs-pw 2>/dev/null; true")
    reset()
    assert(ok, err)
  end)

  it("state = absent removes the drop-in, validated and reloaded", function()
    run(sshd(HARDENING .. ' DenyUsers = "kgs-user"'))
    local path = recipe [[ h:sshd { state = "absent" } ]]
    local c = run(path, "--check", "--diff")
    assert.equal(1, c.recap.changed, c.out)
    assert.matches("-DenyUsers kgs-user", c.out, 1, true)
    assert.equal(0, select(2, sh("test -e " .. DROPIN, true)))
    local r = run(path)
    assert.equal(0, r.code, r.out)
    assert.equal(1, r.recap.changed, r.out)
    assert.equal(1, select(2, sh("test -e " .. DROPIN, true)))
    local s = assert(login_as("kgs-user"))
    s:close()
    assert.equal(0, run(path).recap.changed)
  end)
end)
