-- kengine.ssh against a real OpenSSH sshd on 127.0.0.1 (started by tests/run.sh).
local k = require "kengine"
local H = require "helpers"

local function sha256(path)
  return (assert(k.exec({ "sha256sum", path })).stdout:match("^(%x+)"))
end

describe("ssh session", function()
  local s
  setup(function() s = H.connect() end)
  teardown(function() s:close() end)

  it("returns stdout, stderr and the exit code", function()
    local r = assert(s:exec("echo out; echo err >&2; exit 3"))
    assert.same({ code = 3, stdout = "out\n", stderr = "err\n" }, r)
  end)

  it("treats a non-zero exit status as a result, not an error", function()
    local r, err = s:exec("false")
    assert.is_nil(err)
    assert.equal(1, r.code)
  end)

  it("feeds stdin, binary-safe", function()
    local data = "line1\n\0\255binary\r\n"
    local r = assert(s:exec("cat", { stdin = data }))
    assert.equal(data, r.stdout)
  end)

  it("collects 10 MB of output", function()
    local r = assert(s:exec("head -c 10485760 /dev/urandom | tee /tmp/kg-10mb-$$ | wc -c >&2; " ..
                            "cat /tmp/kg-10mb-$$; rm -f /tmp/kg-10mb-$$"))
    assert.equal(0, r.code)
    assert.equal(10485760, #r.stdout)
    assert.equal("10485760", (r.stderr:gsub("%s", "")))
  end)

  it("puts and gets files atomically with a mode", function()
    local path = "/tmp/kg-put-" .. math.random(1e9)
    assert.is_true(s:put(path, "a\0b", { mode = "0640" }))
    assert.equal("a\0b", s:get(path))
    assert.equal("640", (s:exec("stat -c %a " .. path).stdout:gsub("%s", "")))
    -- no temporary file left beside it
    assert.equal("", s:exec("ls -a /tmp | grep '^.kengine-' || true").stdout)
    s:exec("rm -f " .. path)
  end)

  it("round-trips a binary file through upload and download (sha256)", function()
    local dir = H.tmpdir("updown")
    local src, back = dir .. "/src.bin", dir .. "/back.bin"
    assert.equal(0, k.exec({ "sh", "-c", "head -c 3000000 /dev/urandom > " .. src }).code)
    local remote = "/tmp/kg-upload-" .. math.random(1e9)
    assert.is_true(s:upload(src, remote, { mode = "0600" }))
    assert.is_true(s:download(remote, back))
    assert.equal(sha256(src), sha256(back))
    assert.equal(sha256(src), (s:exec("sha256sum " .. remote).stdout:match("^(%x+)")))
    s:exec("rm -f " .. remote)
  end)

  it("reports a missing remote file as ENOENT naming host and path", function()
    local c, msg, code = s:get("/nonexistent/file")
    assert.is_nil(c)
    assert.equal("ENOENT", code)
    assert.matches("^ENOENT: .*@127%.0%.0%.1:%d+: .*/nonexistent/file", msg)
  end)

  it("leaves the old file in place when a put fails", function()
    local path = "/tmp/kg-keep-" .. math.random(1e9)
    assert.is_true(s:put(path, "old"))
    local ok, msg, code = s:put(path .. "/not-a-dir/x", "new")
    assert.is_nil(ok)
    assert.is_string(msg)
    assert.is_string(code)
    assert.equal("old", s:get(path))
    s:exec("rm -f " .. path)
  end)

  it("times out a command with ETIMEDOUT and stays usable", function()
    local t0 = k.now()
    local r, msg, code = s:exec("sleep 30", { timeout = 1 })
    assert.is_nil(r)
    assert.equal("ETIMEDOUT", code)
    assert.matches("sleep 30", msg)
    assert.is_true(k.now() - t0 < 10)
    assert.equal("still here\n", assert(s:exec("echo still here")).stdout)
  end)

  it("runs several channels on one session at once", function()
    local t0 = k.now()
    local res = k.parallel({ 1, 2, 3, 4, 5 }, function(i)
      return assert(s:exec("sleep 1; echo " .. i)).stdout
    end)
    assert.same({ "1\n", "2\n", "3\n", "4\n", "5\n" }, res)
    -- sequentially this would take 5 s
    assert.is_true(k.now() - t0 < 4.5)
  end)
end)

describe("ssh connect failures", function()
  it("refuses a closed port with ECONNREFUSED", function()
    local s, msg, code = k.ssh.connect(H.ssh_opts({ port = 1 }))
    assert.is_nil(s)
    assert.equal("ECONNREFUSED", code)
    assert.matches("127%.0%.0%.1:1", msg)
  end)

  it("fails a wrong key with EAUTH", function()
    local sd = H.sshd()
    local s, msg, code = k.ssh.connect(H.ssh_opts({ identity = sd.wrong_identity }))
    assert.is_nil(s)
    assert.equal("EAUTH", code)
    assert.matches("authentication failed", msg)
  end)

  it("fails a missing identity file with ENOENT", function()
    local s, _, code = k.ssh.connect(H.ssh_opts({ identity = "/nonexistent/key" }))
    assert.is_nil(s)
    assert.equal("ENOENT", code)
  end)

  it("refuses an unknown host key under the default strict policy", function()
    local empty = H.tmpdir("kh") .. "/known_hosts"
    local s, msg, code = k.ssh.connect(H.ssh_opts({ known_hosts = empty }))
    assert.is_nil(s)
    assert.equal("EHOSTKEY", code)
    assert.matches("unknown host key SHA256:", msg)
  end)

  it("raises on a bad option as a programming error", function()
    assert.has_error(function() k.ssh.connect(H.ssh_opts({ host_key = "yes" })) end,
      'bad option \'host_key\' to \'connect\' ("strict", "accept-new" or "off" expected, got "yes")')
  end)
end)

describe("host key changes", function()
  -- a private sshd this block restarts with a new host key
  local dir, port
  setup(function()
    dir = H.tmpdir("rekey") .. "/sshd"
    assert.equal(0, k.exec({ "tests/support/sshd.sh", "start", dir }).code)
    port = tonumber(k.read_file(dir .. "/port"))
  end)
  teardown(function() k.exec({ "tests/support/sshd.sh", "stop", dir }) end)

  local function with_defaults(extra)
    local o = H.ssh_opts({ port = port, known_hosts = dir .. "/known_hosts", identity = dir .. "/id_ed25519" })
    for key, v in pairs(extra) do o[key] = v end
    return o
  end

  it("accept-new records an unknown key, then refuses a changed one; strict refuses it too", function()
    local kh = H.tmpdir("acceptnew") .. "/known_hosts"
    local s = assert(k.ssh.connect(with_defaults({ known_hosts = kh, host_key = "accept-new" })))
    s:close()
    assert.matches("%[127%.0%.0%.1%]:" .. port, assert(k.read_file(kh)))
    -- strict now accepts the recorded key
    s = assert(k.ssh.connect(with_defaults({ known_hosts = kh })))
    s:close()

    assert.equal(0, k.exec({ "tests/support/sshd.sh", "stop", dir }).code)
    assert.equal(0, k.exec({ "tests/support/sshd.sh", "rekey", dir }).code)
    assert.equal(0, k.exec({ "tests/support/sshd.sh", "start", dir, tostring(port) }).code)

    local s2, msg, code = k.ssh.connect(with_defaults({ known_hosts = kh, host_key = "accept-new" }))
    assert.is_nil(s2)
    assert.equal("EHOSTKEY", code)
    assert.matches("host key changed", msg)
    s2, msg, code = k.ssh.connect(with_defaults({ known_hosts = kh }))
    assert.is_nil(s2)
    assert.equal("EHOSTKEY", code)
    assert.matches("man%-in%-the%-middle", msg)
  end)
end)

describe("session handles", function()
  it("closing twice is harmless and a closed session raises on use", function()
    local s = H.connect()
    s:close()
    s:close()
    assert.has_error(function() s:exec("true") end, "attempt to use a closed session")
    assert.matches("closed", tostring(s))
  end)

  it("closes with <close> at the end of a block", function()
    local ref
    do
      local s <close> = H.connect()
      ref = s
      assert.is_true(s:is_open())
    end
    assert.is_false(ref:is_open())
  end)

  it("frees the sockets of garbage-collected sessions", function()
    local port = H.sshd().port
    collectgarbage()
    collectgarbage()
    local base = H.connections_to(port)
    local weak = setmetatable({}, { __mode = "v" })
    local strong = {}
    for i = 1, 10 do
      strong[i] = H.connect()
      assert(strong[i]:exec("true"))
      weak[i] = strong[i]
    end
    assert.equal(base + 10, H.connections_to(port))
    strong = nil -- luacheck: ignore 311
    collectgarbage()
    collectgarbage()
    assert.is_nil(next(weak))
    assert.equal(base, H.connections_to(port))
  end)
end)
