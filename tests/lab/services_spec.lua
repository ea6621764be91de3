-- service (SysV init: the lab has no systemd), wait_for, download, command and shell against a real Debian
-- lab host.  Every state is checked with a direct command over a separate SSH session.  The test service
-- is a tiny /etc/init.d script around start-stop-daemon; the HTTP server is python3's http.server on
-- 127.0.0.1 inside the lab host, started here with a direct command.
local k = require "kengine"
local H = require "helpers"

local HOST, S
local PORT = 18089            -- the http.server inside the lab host (its loopback)
local WWW = "/srv/kg-www"





local INIT_SCRIPT = [[
#!/bin/sh
### BEGIN INIT INFO
# Provides:          NAME
# Required-Start:    $remote_fs
# Required-Stop:     $remote_fs
# Default-Start:     2 3 4 5
# Default-Stop:      0 1 6
# Short-Description: kengine test service
### END INIT INFO
PID=/run/NAME.pid
case "$1" in
  start) start-stop-daemon --start --quiet --oknodo --background --make-pidfile --pidfile $PID --exec /bin/sleep -- 100000 ;;
  stop) start-stop-daemon --stop --quiet --oknodo --pidfile $PID --retry 5; rm -f $PID ;;
  restart) "$0" stop; "$0" start ;;
  reload) echo reload >> /run/NAME.reloads ;;
  status) start-stop-daemon --status --pidfile $PID ;;
  *) echo "usage: $0 start|stop|restart|reload|status" >&2; exit 2 ;;
esac
]]

-- a fresh init script /etc/init.d/NAME (not running, no rc links)
local kit = H.lab_kit(function() return HOST, S end)
local sh, recipe, run, converge = kit.sh, kit.recipe, kit.run, kit.converge
local function install_service(name)
  sh("/etc/init.d/" .. name .. " stop >/dev/null 2>&1; update-rc.d -f " .. name .. " remove >/dev/null 2>&1; " ..
    "rm -f /run/" .. name .. ".reloads; true")
  assert(S:exec("cat > /etc/init.d/" .. name .. " && chmod 0755 /etc/init.d/" .. name,
    { stdin = (INIT_SCRIPT:gsub("NAME", name)) }).code == 0)
end

local function running(name) return select(2, sh("/etc/init.d/" .. name .. " status", true)) == 0 end
local function links(name) return (sh("ls /etc/rc2.d /etc/rc3.d /etc/rc5.d | grep -E '^[SK][0-9]+" .. name .. "$' " ..
  "| cut -c1 | sort | uniq -c | tr -s ' ' | sed 's/^ //' || true")) end

local function sha256(text)
  return (assert(k.exec({ "sha256sum" }, { stdin = text })).stdout:match("^(%x+)"))
end

describe("service, wait_for, download, command/shell on a lab host", function()
  setup(function()
    local lab = H.lab()
    HOST = lab.name .. "-3"
    S = H.lab_connect(HOST)
    sh("rm -rf /tmp/kgs " .. WWW .. " && mkdir -p /tmp/kgs " .. WWW)
    -- the HTTP server, in the lab host's own loopback
    sh("cd " .. WWW .. " && { nohup python3 -m http.server " .. PORT .. " --bind 127.0.0.1 >/tmp/kgs/http.log 2>&1 " ..
      "</dev/null & echo $! > /tmp/kgs/http.pid; }")
    sh("for i in $(seq 50); do curl -s -o /dev/null http://127.0.0.1:" .. PORT .. "/ && exit 0; sleep 0.1; done; exit 1")
  end)

  teardown(function()
    if S then
      sh("kill $(cat /tmp/kgs/http.pid) 2>/dev/null; for s in kgsvc1 kgsvc2 kgsvc3; do /etc/init.d/$s stop; " ..
        "update-rc.d -f $s remove; rm -f /etc/init.d/$s /run/$s.reloads; done >/dev/null 2>&1; " ..
        "rm -rf /tmp/kgs " .. WWW, true)
      S:close()
    end
  end)

  describe("service", function()
    it("starts and enables a SysV service; --check changes nothing; a re-run changes nothing", function()
      install_service("kgsvc1")
      local path = recipe [[ h:service { name = "kgsvc1", state = "started", enabled = true } ]]
      local c, r = converge(path, 1, function(c)
        assert.equal("start, enable", c.steps[1].msg)
        assert.is_false(running("kgsvc1"))
        assert.equal("", links("kgsvc1"))
      end)
      assert.equal("changed", c.steps[1].status)
      assert.equal("start, enable", r.steps[1].msg)
      assert.is_true(running("kgsvc1"))
      assert.equal("3 S\n", links("kgsvc1"))
    end)

    it("stops and disables it", function()
      install_service("kgsvc2")
      sh("/etc/init.d/kgsvc2 start && update-rc.d kgsvc2 defaults")
      assert.is_true(running("kgsvc2"))
      local path = recipe [[ h:service { name = "kgsvc2", state = "stopped", enabled = false } ]]
      converge(path, 1, function() assert.is_true(running("kgsvc2")) end)
      assert.is_false(running("kgsvc2"))
      assert.equal("3 K\n", links("kgsvc2"))
    end)

    it("restarted and reloaded are actions: a change every time", function()
      install_service("kgsvc3")
      sh("/etc/init.d/kgsvc3 start")
      local pid = sh("cat /run/kgsvc3.pid")
      local path = recipe [[
        h:service { name = "kgsvc3", state = "reloaded" }
        h:service { name = "kgsvc3", state = "restarted" }
      ]]
      local c = run(path, "--check")
      assert.equal(2, c.recap.changed, c.out)
      assert.equal(pid, sh("cat /run/kgsvc3.pid"))
      assert.equal("no\n", sh("test -e /run/kgsvc3.reloads && echo yes || echo no"))
      for i = 1, 2 do
        local r = run(path)
        assert.equal(0, r.code, r.out)
        assert.equal(2, r.recap.changed, r.out)
        assert.same({ "reload", "restart" }, { r.steps[1].msg, r.steps[2].msg })
        assert.equal(i, select(2, sh("cat /run/kgsvc3.reloads"):gsub("reload\n", "")))
        local now = sh("cat /run/kgsvc3.pid")
        assert.are_not.equal(pid, now)
        pid = now
      end
      assert.is_true(running("kgsvc3"))
      -- reloading a stopped service starts it
      sh("/etc/init.d/kgsvc3 stop")
      local p2 = recipe [[ h:service { name = "kgsvc3", state = "reloaded" } ]]
      local r = run(p2)
      assert.equal("start", r.steps[1].msg)
      assert.is_true(running("kgsvc3"))
    end)

    it("fails on an unknown service, naming it; in check mode it may come from an earlier step", function()
      local path = recipe [[ h:service { name = "kg-no-such-service", state = "started" } ]]
      local r = run(path)
      assert.equal(1, r.code, r.out)
      assert.equal("failed", r.steps[1].status)
      assert.equal("service kg-no-such-service not found (no /etc/init.d/kg-no-such-service)", r.steps[1].msg)
      local c = run(path, "--check")
      assert.equal(0, c.code, c.out)
      assert.equal("changed", c.steps[1].status)
      assert.matches("not found", c.steps[1].msg, 1, true)
    end)
  end)

  describe("wait_for", function()
    it("waits for a port, a URL's status and a command; read-only, so it runs in check mode too", function()
      assert(S:exec("echo hello > " .. WWW .. "/ready.txt").code == 0)
      -- the marker appears 1.5 s from now, by a process the test starts
      sh("rm -f /tmp/kgs/later; (sleep 1.5; touch /tmp/kgs/later) >/dev/null 2>&1 </dev/null &")
      local path = recipe(string.format([[
        h:wait_for { port = 22 }
        h:wait_for { port = %d, host = "127.0.0.1", timeout = 5 }
        h:wait_for { url = "http://127.0.0.1:%d/ready.txt" }
        h:wait_for { url = "http://127.0.0.1:%d/missing", status = { 404, 410 }, timeout = 5 }
        h:wait_for { command = "test -e /tmp/kgs/later", timeout = 10, interval = 0.25 }
      ]], PORT, PORT, PORT))
      for _, args in ipairs({ { "--check" }, {} }) do
        local r = run(path, table.unpack(args))
        assert.equal(0, r.code, r.out)
        assert.equal(5, #r.steps, r.out)
        for _, st in ipairs(r.steps) do assert.equal("ok", st.status, r.out) end
        assert.equal(0, r.recap.changed)
      end
      -- the first pass had to wait for the marker
      sh("test -e /tmp/kgs/later")
    end)

    it("fails with a clear message when the time is up, after a bounded number of attempts", function()
      local path = recipe [[
        h:wait_for { port = 1, timeout = 1.5, interval = 0.5, ignore_errors = true }
        h:wait_for { url = "http://127.0.0.1:1/", timeout = 1, interval = 0.5, ignore_errors = true }
        h:wait_for { command = "exit 3", timeout = 1, interval = 0.5 }
      ]]
      local t0 = k.now()
      local r = run(path)
      assert.is_true(k.now() - t0 < 10)
      assert.equal(1, r.code, r.out)
      assert.equal(3, #r.steps)
      for _, st in ipairs(r.steps) do assert.equal("failed", st.status) end
      assert.matches("^timed out after 1%.%d s %(%d attempts%): port not open: 127%.0%.0%.1:1; last: connection refused$",
        r.steps[1].msg)
      assert.matches("no status 200 from http://127.0.0.1:1/; last: no response (curl exit 7)", r.steps[2].msg, 1, true)
      assert.matches("command did not succeed; last: exit status 3", r.steps[3].msg, 1, true)
    end)

    it("rejects a call without exactly one condition", function()
      local r = run(recipe [[ h:wait_for { port = 22, url = "http://127.0.0.1/" } ]])
      assert.equal(1, r.code)
      assert.matches("wait_for: give exactly one of port, url or command", r.out, 1, true)
    end)
  end)

  describe("download", function()
    it("downloads, verifies and places a file; skipped when the checksum matches", function()
      local body = "kengine download test " .. math.random(1e9) .. "\n"
      assert(S:exec("cat > " .. WWW .. "/tool.txt", { stdin = body }).code == 0)
      local path = recipe(string.format([[
        h:download { url = "http://127.0.0.1:%d/tool.txt", dest = "/tmp/kgs/dl/tool", sha256 = %q, mode = "0750" }
      ]], PORT, sha256(body)))
      sh("mkdir -p /tmp/kgs/dl")
      converge(path, 1, function(c)
        assert.matches("download http://127.0.0.1:" .. PORT .. "/tool.txt", c.steps[1].msg, 1, true)
        assert.equal("", sh("ls -A /tmp/kgs/dl"))
      end)
      assert.equal(body, sh("cat /tmp/kgs/dl/tool"))
      assert.equal("750 root\n", sh("stat -c '%a %U' /tmp/kgs/dl/tool"))
      -- the converged runs did not fetch it again: one GET in the server's log
      assert.equal("1\n", sh("grep -c 'GET /tool.txt' /tmp/kgs/http.log"))
      -- only the mode drifted: fixed without a download
      sh("chmod 0644 /tmp/kgs/dl/tool")
      local m = run(path)
      assert.equal(1, m.recap.changed, m.out)
      assert.equal("mode 644 → 750", m.steps[1].msg)
      assert.equal("1\n", sh("grep -c 'GET /tool.txt' /tmp/kgs/http.log"))
    end)

    it("a wrong checksum fails clearly and leaves the old file alone", function()
      assert(S:exec("cat > " .. WWW .. "/new.txt", { stdin = "new content\n" }).code == 0)
      sh("mkdir -p /tmp/kgs/dl2 && echo 'old content' > /tmp/kgs/dl2/file")
      local want = sha256("what we expected\n")
      local path = recipe(string.format([[
        h:download { url = "http://127.0.0.1:%d/new.txt", dest = "/tmp/kgs/dl2/file", sha256 = %q }
      ]], PORT, want))
      local r = run(path)
      assert.equal(1, r.code, r.out)
      assert.equal("failed", r.steps[1].status)
      assert.equal(string.format("checksum mismatch for http://127.0.0.1:%d/new.txt: expected sha256 %s, got %s " ..
        "(/tmp/kgs/dl2/file left unchanged)", PORT, want, sha256("new content\n")), r.steps[1].msg)
      assert.equal("old content\n", sh("cat /tmp/kgs/dl2/file"))
      assert.equal("file\n", sh("ls -A /tmp/kgs/dl2"))   -- no temp file left behind
      -- and a URL that does not exist
      local p404 = recipe(string.format([[
        h:download { url = "http://127.0.0.1:%d/missing.bin", dest = "/tmp/kgs/dl2/missing" }
      ]], PORT))
      local n = run(p404)
      assert.equal(1, n.code)
      assert.matches("cannot download http://127.0.0.1:" .. PORT .. "/missing.bin (curl exit 22)", n.steps[1].msg, 1, true)
      assert.equal("file\n", sh("ls -A /tmp/kgs/dl2"))
    end)
  end)

  describe("command and shell", function()
    it("command passes argv literally; shell runs a command line; creates/removes make them idempotent", function()
      local path = recipe [=[
        local r = h:command { argv = { "printf", "%s|", "a b", "$HOME", ">" }, changed_when = false, check_safe = true }
        h:shell { cmd = "cat > /tmp/kgs/argv", stdin = r.stdout, creates = "/tmp/kgs/argv" }
        h:command { cmd = [[sh -c 'echo "$1 $PWD $KG_X" > /tmp/kgs/split' - "two words"]], chdir = "/etc",
                    env = { KG_X = "x y" }, creates = "/tmp/kgs/split" }
        h:shell { cmd = "echo $(( 6 * 7 )) | tee /tmp/kgs/shell >/dev/null", creates = "/tmp/kgs/shell" }
        h:shell { cmd = "rm /tmp/kgs/gone", removes = "/tmp/kgs/gone" }
      ]=]
      sh("rm -f /tmp/kgs/argv /tmp/kgs/split /tmp/kgs/shell; touch /tmp/kgs/gone")
      local c = run(path, "--check")
      assert.equal(0, c.code, c.out)
      assert.equal("ok", c.steps[1].status)         -- check_safe: it ran, read-only
      for i = 2, 5 do assert.equal("skipped", c.steps[i].status, c.out) end
      assert.equal("gone\n", sh("ls /tmp/kgs | grep -E '^(argv|split|shell|gone)$'"))
      local r = run(path)
      assert.equal(0, r.code, r.out)
      assert.equal(4, r.recap.changed, r.out)
      assert.equal("a b|$HOME|>|", sh("cat /tmp/kgs/argv"))
      assert.equal("two words /etc x y\n", sh("cat /tmp/kgs/split"))
      assert.equal("42\n", sh("cat /tmp/kgs/shell"))
      sh("test ! -e /tmp/kgs/gone")
      local again = run(path)
      assert.equal(0, again.code, again.out)
      assert.equal(0, again.recap.changed, again.out)
    end)

    it("a timeout kills the command and fails the step, the host stays reachable", function()
      local path = recipe [[
        h:shell { cmd = "sleep 30", timeout = 1, ignore_errors = true }
        h:command { argv = { "true" } }
      ]]
      local t0 = k.now()
      local r = run(path)
      assert.is_true(k.now() - t0 < 10)
      assert.equal(0, r.code, r.out)
      assert.equal("failed", r.steps[1].status)
      assert.equal(124, r.steps[1].code)
      assert.equal("changed", r.steps[2].status)
      assert.equal(0, r.recap.unreachable)
    end)

    it("rejects unknown parameters and cmd + argv together", function()
      local r = run(recipe [[ h:command { argv = { "true" }, cmd = "true" } ]])
      assert.matches("command: give argv (a list) or cmd (a string)", r.out, 1, true)
      r = run(recipe [[ h:shell { cmd = "true", bogus = 1 } ]])
      assert.matches("shell: unknown parameter 'bogus'", r.out, 1, true)
    end)
  end)
end)
