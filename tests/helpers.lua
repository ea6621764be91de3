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

return H
