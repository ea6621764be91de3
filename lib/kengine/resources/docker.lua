--- docker, docker_image, docker_container: the Docker engine and what runs on it.
-- h:docker{ source = "auto"|"distro"|"docker", storage_driver = nil|"vfs"|"overlay2"|…, daemon = {…},
--           install_recommends = false, repo_url = "https://download.docker.com/linux" }
-- h:docker_image{ name = "app:1", context = "local/dir" (docker build on the target) or
--                 tarball = "local/image.tar" (docker load; .tar.gz/.tar.xz too),
--                 dockerfile = "Dockerfile", build_args = {…}, target = nil, state = "present"|"absent" }
-- h:docker_container{ name =, image =, state = "started"|"stopped"|"absent", command =, entrypoint =,
--                     env = { NAME = "v" or k.secret(…) }, ports = { "8080:80", "127.0.0.1:8443:443" },
--                     default_host_ip = "0.0.0.0", volumes = { "/srv/data:/data:ro" }, restart = "no"|…,
--                     capabilities = {…}, cap_drop = {…}, privileged = false, labels = {…}, hostname =,
--                     network =, user =, working_dir =, extra_args = {…}, stop_timeout = 10 }
--
-- Everything goes through the `docker` CLI on the target, over the host's one
-- SSH session: `docker inspect`/`docker image inspect` with a JSON `--format`
-- for probes, `docker load`/`build`/`create`/`start`/`stop`/`rm` for changes.
-- That needs nothing but the CLI the engine ships with (no socket forwarding,
-- no API version negotiation) and honours sudo like every other command.
-- Files (image tarballs, build contexts) are streamed with the session's
-- upload.  Container env values travel on stdin into a 0600 --env-file that
-- is removed right after `docker create`: never on a command line.
local recipe = require "kengine.recipe"
local secret = require "kengine.secret"
local json = require "kengine.json"
local proc = require "kengine.proc"
local quote = require("kengine.host").quote
local package = require "kengine.resources.package"
local apt_repository = require "kengine.resources.apt_repository"

local M = {}

local function fail(msg) error(msg, 0) end

local trim = require("kengine.host").trim

local tail = require("kengine.host").tail

local function output_of(r) return trim(r.stderr ~= "" and r.stderr or r.stdout) end

---------------------------------------------------------------------------
-- SHA-256 (for spec and context hashes computed on the controller)

local K256 = {
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
  0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
  0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
  0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
  0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
}
local W32 = 0xffffffff

local function rrot(x, n) return ((x >> n) | (x << (32 - n))) & W32 end

--- SHA-256 of a string, as 64 hex digits.
function M.sha256(msg)
  local hs = { 0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19 }
  local len = #msg
  msg = msg .. "\128" .. string.rep("\0", (55 - len) % 64) .. string.pack(">I8", len * 8)
  local w = {}
  for chunk = 1, #msg, 64 do
    for j = 1, 16 do w[j] = string.unpack(">I4", msg, chunk + (j - 1) * 4) end
    for j = 17, 64 do
      local x, y = w[j - 15], w[j - 2]
      local s0 = rrot(x, 7) ~ rrot(x, 18) ~ (x >> 3)
      local s1 = rrot(y, 17) ~ rrot(y, 19) ~ (y >> 10)
      w[j] = (w[j - 16] + s0 + w[j - 7] + s1) & W32
    end
    local a, b, c, d, e, f, g, h = hs[1], hs[2], hs[3], hs[4], hs[5], hs[6], hs[7], hs[8]
    for j = 1, 64 do
      local t1 = (h + (rrot(e, 6) ~ rrot(e, 11) ~ rrot(e, 25)) + ((e & f) ~ (~e & g)) + K256[j] + w[j]) & W32
      local t2 = ((rrot(a, 2) ~ rrot(a, 13) ~ rrot(a, 22)) + ((a & b) ~ (a & c) ~ (b & c))) & W32
      h, g, f, e, d, c, b, a = g, f, e, (d + t1) & W32, c, b, a, (t1 + t2) & W32
    end
    hs[1], hs[2], hs[3], hs[4] = (hs[1] + a) & W32, (hs[2] + b) & W32, (hs[3] + c) & W32, (hs[4] + d) & W32
    hs[5], hs[6], hs[7], hs[8] = (hs[5] + e) & W32, (hs[6] + f) & W32, (hs[7] + g) & W32, (hs[8] + h) & W32
  end
  return string.format(string.rep("%08x", 8), table.unpack(hs))
end

--- A canonical text of a value (sorted keys, secrets revealed): what spec hashes are taken of.
local function canon(v)
  if secret.is(v) then v = secret.reveal(v) end
  local t = type(v)
  if t == "string" then return string.format("%q", v) end
  if t == "number" or t == "boolean" or t == "nil" then return tostring(v) end
  local keys = {}
  for key in pairs(v) do keys[#keys + 1] = key end
  table.sort(keys, function(x, y) return tostring(x) < tostring(y) end)
  local parts = {}
  for _, key in ipairs(keys) do parts[#parts + 1] = canon(key) .. "=" .. canon(v[key]) end
  return "{" .. table.concat(parts, ",") .. "}"
end
M.canon = canon

--- Canonical JSON (sorted keys, two-space indent) for files kengine writes.
local function json_pretty(v, indent)
  indent = indent or ""
  if type(v) ~= "table" or v == json.null then return json.encode(v) end
  local inner = indent .. "  "
  local n = #v
  local is_array = n > 0 or getmetatable(v) ~= nil and next(v) == nil
  if is_array then
    if n == 0 then return "[]" end
    local parts = {}
    for i = 1, n do parts[i] = inner .. json_pretty(v[i], inner) end
    return "[\n" .. table.concat(parts, ",\n") .. "\n" .. indent .. "]"
  end
  local keys = {}
  for key in pairs(v) do keys[#keys + 1] = tostring(key) end
  if #keys == 0 then return "{}" end
  table.sort(keys)
  local parts = {}
  for i, key in ipairs(keys) do parts[i] = inner .. json.encode(key) .. ": " .. json_pretty(v[key], inner) end
  return "{\n" .. table.concat(parts, ",\n") .. "\n" .. indent .. "}"
end
M.json_pretty = json_pretty

---------------------------------------------------------------------------
-- shared pieces


local function no_daemon(text)
  return text:find("Cannot connect to the Docker daemon", 1, true) or text:find("Is the docker daemon running", 1, true)
end

-- the docker CLI is there and answers: nil, or the reason it does not
local function docker_problem(res)
  if res.rc == 127 or res.out:find("docker: not found", 1, true) or res.out:find("docker: command not found", 1, true)
  then
    return "docker is not installed"
  end
  if no_daemon(res.out) then return "the Docker daemon is not running" end
  return nil
end

-- a local temporary file path (removed by the caller)
local function local_tmp(suffix)
  local r = proc.exec({ "mktemp", "--suffix", suffix or "", "/tmp/kengine-XXXXXXXX" })
  if not r or r.code ~= 0 then fail("cannot create a local temporary file") end
  return trim(r.stdout)
end

-- Upload a local file into a fresh remote directory (made as the login user,
-- so it works with sudo too) and run fn(remote_path); the directory goes after.
local function with_upload(h, local_path, remote_name, fn)
  local r = h:raw("umask 077; mktemp -d \"${TMPDIR:-/tmp}/kengine-XXXXXXXX\"", { sudo = false })
  if r.code ~= 0 then fail("cannot create a temporary directory on the target: " .. output_of(r)) end
  local dir = trim(r.stdout)
  local remote = dir .. "/" .. remote_name
  local ok, err = h.session:upload(local_path, remote, { mode = "0600" })
  local res
  if ok then
    ok, res = pcall(fn, remote)
    if not ok then err = res end
  else
    err = "cannot upload " .. local_path .. ": " .. tostring(err)
  end
  h:raw("rm -rf -- " .. quote(dir), { sudo = false })
  if not ok then error(err, 0) end
  return res
end

local function ensure_packages(h, names, opts)
  local p = { name = names, state = "present", update_cache = true, cache_valid_time = 3600, lock_timeout = 300,
    install_recommends = opts and opts.install_recommends }
  local ok, msg = package.validate(p)
  if not ok then fail("package: " .. msg) end
  local st = package.probe(h, p)
  local changes = package.diff(h, p, st)
  if changes then package.apply(h, p, st, changes) end
end
M.ensure_packages = ensure_packages

---------------------------------------------------------------------------
-- docker: the engine

local DAEMON_JSON = "/etc/docker/daemon.json"
local ENGINE_PKGS = {
  distro = { "docker.io", "ca-certificates", "xz-utils" },
  docker = { "docker-ce", "docker-ce-cli", "containerd.io", "ca-certificates", "xz-utils" },
}

local function engine_source(p, st)
  if p.source ~= "auto" then return p.source end
  if st.installed["docker-ce"] then return "docker" end
  if st.installed["docker.io"] then return "distro" end
  return st.os_id == "ubuntu" and "docker" or "distro"
end

-- is dockerd answering, and how to (re)start it
local START = [[
up() { docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }
wait_up() { i=0; while [ $i -lt 120 ]; do up && return 0; sleep 0.5; i=$((i+1)); done; return 1; }
stop_docker() {
  if [ -d /run/systemd/system ]; then systemctl stop docker.socket docker >/dev/null 2>&1; return; fi
  service docker stop >/dev/null 2>&1
  p=$(cat /var/run/docker.pid 2>/dev/null)
  if [ -n "$p" ] && kill -0 "$p" 2>/dev/null; then
    kill "$p"; i=0; while kill -0 "$p" 2>/dev/null && [ $i -lt 120 ]; do sleep 0.5; i=$((i+1)); done
  fi
}
start_docker() {
  if [ -d /run/systemd/system ]; then
    systemctl enable docker >/dev/null 2>&1; systemctl start docker || return 1; wait_up; return
  fi
  # sysvinit: Debian's /etc/init.d/docker fails inside containers (its ulimit -n is above the hard
  # limit); then start dockerd the way the script would, with the same pid file and log
  if service docker start >/dev/null 2>&1 && wait_up; then return 0; fi
  up && return 0
  d=$(command -v dockerd) || { echo "dockerd not found" >&2; return 1; }
  ulimit -n "$(ulimit -Hn)" 2>/dev/null
  if command -v start-stop-daemon >/dev/null 2>&1; then
    start-stop-daemon --start --background --no-close --exec "$d" --pidfile /var/run/docker-ssd.pid \
      --make-pidfile -- -p /var/run/docker.pid >>/var/log/docker.log 2>&1 </dev/null
  else
    setsid "$d" -p /var/run/docker.pid >>/var/log/docker.log 2>&1 </dev/null &
  fi
  wait_up
}
docker_log() {
  if [ -d /run/systemd/system ]; then journalctl -u docker -n 15 --no-pager 2>&1; else tail -n 15 /var/log/docker.log 2>&1; fi
}
]]

local function engine_probe(h)
  local all = {}
  local seen = {}
  for _, list in pairs(ENGINE_PKGS) do
    for _, n in ipairs(list) do if not seen[n] then seen[n] = true; all[#all + 1] = n end end
  end
  all[#all + 1] = "apparmor"
  table.sort(all)
  local res = h:batch({
    ". /etc/os-release 2>/dev/null; echo \"$ID $VERSION_CODENAME\"",
    "dpkg-query -W -f='${Package} ${db:Status-Abbrev}\\n' " .. table.concat(all, " ") .. " 2>/dev/null; true",
    "cat /sys/module/apparmor/parameters/enabled 2>/dev/null",
    "docker version --format '{{.Server.Version}}'",
    "[ -d /run/systemd/system ]",
    "cat " .. DAEMON_JSON,
  })
  local st = { installed = {} }
  st.os_id, st.codename = res[1].out:match("^(%S*) ?(%S*)")
  for pkg, status in res[2].out:gmatch("(%S+) (%S+)[^\n]*") do
    if status:sub(1, 2) == "ii" then st.installed[pkg] = true end
  end
  st.apparmor = trim(res[3].out) == "Y"
  st.running = res[4].rc == 0
  st.version = st.running and trim(res[4].out) or nil
  st.systemd = res[5].rc == 0
  st.daemon_json = res[6].rc == 0 and res[6].out or nil
  return st
end

-- Docker's own apt repository, through the apt_repository resource
local function repo_params(p, st)
  local rp = { name = "docker", uri = p.repo_url .. "/" .. st.os_id, suite = st.codename, components = { "stable" },
    key_url = p.repo_url .. "/" .. st.os_id .. "/gpg", keyring = "/etc/apt/keyrings/docker.asc" }
  for key, v in pairs(apt_repository.defaults or {}) do if rp[key] == nil then rp[key] = v end end
  local ok, msg = apt_repository.validate(rp)
  if not ok then fail("Docker's apt repository: " .. msg) end
  return rp
end

-- the daemon.json kengine wants, or nil when it does not manage the file
local function wanted_daemon_json(p, st)
  if p.storage_driver == nil and p.daemon == nil then return nil end
  local cur = {}
  if st.daemon_json and trim(st.daemon_json) ~= "" then
    local v, err = json.decode(st.daemon_json)
    if type(v) ~= "table" then fail(DAEMON_JSON .. " is not a JSON object: " .. tostring(err)) end
    cur = v
  end
  local want = {}
  for key, v in pairs(cur) do want[key] = v end
  for key, v in pairs(p.daemon or {}) do want[key] = v end
  if p.storage_driver then want["storage-driver"] = p.storage_driver end
  if st.daemon_json and canon(cur) == canon(want) then return nil end
  return json_pretty(want) .. "\n"
end

M.docker = recipe.resource {
  name = "docker",
  description = "the Docker engine installed and running",
  defaults = { source = "auto", install_recommends = false, repo_url = "https://download.docker.com/linux" },
  label = function(p) return p.storage_driver and ("storage-driver=" .. p.storage_driver) or "" end,
  validate = function(p)
    if p.source ~= "auto" and p.source ~= "distro" and p.source ~= "docker" then
      return false, "source must be 'auto', 'distro' (docker.io) or 'docker' (Docker's repository)"
    end
    if p.storage_driver ~= nil and (type(p.storage_driver) ~= "string" or not p.storage_driver:match("^[%w%-]+$")) then
      return false, "storage_driver must be a driver name like 'overlay2' or 'vfs'"
    end
    if p.daemon ~= nil and type(p.daemon) ~= "table" then return false, "daemon must be a table (daemon.json keys)" end
    if p.state ~= nil and p.state ~= "present" then return false, "state must be 'present'" end
    return true
  end,

  probe = function(h, p)
    local st = engine_probe(h)
    if engine_source(p, st) == "docker" then
      st.repo_params = repo_params(p, st)
      st.repo_state = apt_repository.probe(h, st.repo_params)
    end
    return st
  end,

  diff = function(h, p, st)
    local source = engine_source(p, st)
    if p.source ~= "auto" then
      local other = source == "docker" and "docker.io" or "docker-ce"
      if st.installed[other] then
        fail(other .. " is installed; source = '" .. source .. "' would replace it: remove it first, or use " ..
          "source = 'auto'")
      end
    end
    local pkgs = {}
    for _, n in ipairs(ENGINE_PKGS[source]) do pkgs[#pkgs + 1] = n end
    if st.apparmor then pkgs[#pkgs + 1] = "apparmor" end -- dockerd needs its parser when the kernel enforces it
    local missing = {}
    for _, n in ipairs(pkgs) do if not st.installed[n] then missing[#missing + 1] = n end end
    local what, fields = {}, {}
    local repo = st.repo_params and apt_repository.diff(h, st.repo_params, st.repo_state)
    if repo then
      what[#what + 1] = "Docker's apt repository: " .. repo.summary
      fields.repository = repo.fields
    end
    if #missing > 0 then what[#what + 1] = "install " .. table.concat(missing, ", "); fields.install = missing end
    local dj = wanted_daemon_json(p, st)
    if dj then what[#what + 1] = "write " .. DAEMON_JSON; fields.daemon_json = true end
    local start
    if not st.running then
      start = "start"
    elseif dj then
      start = "restart"
    end
    if start then what[#what + 1] = start .. " dockerd"; fields.daemon = start end
    if #what == 0 then return nil end
    return { summary = table.concat(what, ", "), fields = fields, missing = missing, repo = repo,
      daemon_json = dj, start = start, source = source,
      before = dj and (st.daemon_json or "") or nil, after = dj, name = dj and DAEMON_JSON or nil }
  end,

  apply = function(h, p, st, ch)
    if ch.repo then apt_repository.apply(h, st.repo_params, st.repo_state, ch.repo) end
    if ch.daemon_json then
      local r = h:raw("mkdir -p /etc/docker")
      if r.code ~= 0 then fail("cannot create /etc/docker: " .. output_of(r)) end
      -- written before the packages: a daemon started by the package's own scripts already uses it
      h:write(DAEMON_JSON, ch.daemon_json, { mode = "0644" })
    end
    if #ch.missing > 0 then ensure_packages(h, ch.missing, { install_recommends = p.install_recommends }) end
    local r = h:raw(START .. table.concat({
      "if up; then",
      ch.start == "restart" and "  stop_docker; start_docker || { docker_log >&2; exit 1; }" or "  :",
      "else",
      "  start_docker || { docker_log >&2; exit 1; }",
      "fi",
      "docker version --format '{{.Server.Version}}'",
    }, "\n"))
    if r.code ~= 0 then fail("dockerd did not start: " .. tail(r.stderr, 8)) end
  end,
}

---------------------------------------------------------------------------
-- docker_image

-- the image id and first tag of a `docker save` tarball (its manifest.json)
local function tarball_image(path)
  local f = io.open(path, "rb")
  if not f then fail("tarball " .. path .. " not found") end
  f:close()
  local r = proc.exec({ "sh", "-c", "tar -xOf \"$1\" manifest.json 2>/dev/null || tar -xOf \"$1\" ./manifest.json",
    "sh", path })
  if not r or r.code ~= 0 then fail("tarball " .. path .. " has no manifest.json (not a `docker save` archive?)") end
  local m = json.decode(r.stdout)
  if type(m) ~= "table" or type(m[1]) ~= "table" or type(m[1].Config) ~= "string" then
    fail("tarball " .. path .. ": unexpected manifest.json")
  end
  local hex = m[1].Config:match("(%x+)%.json$") or m[1].Config:match("sha256/(%x+)$")
  if not hex or #hex ~= 64 then fail("tarball " .. path .. ": cannot tell the image id from " .. m[1].Config) end
  local tags = m[1].RepoTags
  return "sha256:" .. hex, type(tags) == "table" and tags[1] or nil
end

local TAR_FLAGS = { "--sort=name", "--mtime=@0", "--owner=0", "--group=0", "--numeric-owner", "--format=gnu" }

-- a hash of the build context (content, modes, names; not mtimes) and build options
local function context_hash(p)
  local df = p.dockerfile or "Dockerfile"
  local f = io.open(p.context .. "/" .. df, "rb")
  if not f then fail("build context " .. p.context .. " has no " .. df) end
  f:close()
  local r = proc.exec({ "sh", "-c", "{ tar " .. table.concat(TAR_FLAGS, " ") ..
    " -C \"$1\" -cf - . || echo KENGINE-TAR-FAILED >&2; } | " ..
    "{ if command -v sha256sum >/dev/null; then sha256sum; else shasum -a 256; fi; }", "sh", p.context })
  if not r or r.code ~= 0 or r.stderr:find("KENGINE-TAR-FAILED", 1, true) then
    fail("cannot read the build context " .. p.context .. ": " .. (r and trim(r.stderr) or "tar failed"))
  end
  local tar_sha = r.stdout:match("^(%x+)")
  return M.sha256("kengine-context-v1\n" .. tar_sha .. "\n" .. canon({ dockerfile = df, args = p.build_args or {},
    target = p.target or "" }))
end

local IMAGE_FMT = [['{"Id":{{json .Id}},"Labels":{{json .Config.Labels}}}']]

local function image_names(p)
  if p.tarball then
    local id, tag = tarball_image(p.tarball)
    return id, p.name or tag
  end
  return nil, p.name
end

M.docker_image = recipe.resource {
  name = "docker_image",
  description = "a Docker image built from a local context or loaded from a tarball",
  defaults = { state = "present" },
  label = function(p) return p.name or p.tarball or "" end,
  validate = function(p)
    if p.state ~= "present" and p.state ~= "absent" then return false, "state must be 'present' or 'absent'" end
    if p.name ~= nil and (type(p.name) ~= "string" or not p.name:match("^[%w][%w%._/:@%-]*$")) then
      return false, "name must be an image reference like 'app:1'"
    end
    if p.state == "absent" then
      if not p.name then return false, "name is required" end
      return true
    end
    if (p.context == nil) == (p.tarball == nil) then
      return false, "give either context (a local directory to build) or tarball (a local image archive)"
    end
    if p.context and not p.name then return false, "name is required to build an image" end
    if p.context ~= nil and type(p.context) ~= "string" then return false, "context must be a directory path" end
    if p.tarball ~= nil and type(p.tarball) ~= "string" then return false, "tarball must be a file path" end
    if p.build_args ~= nil then
      if type(p.build_args) ~= "table" then return false, "build_args must be a table" end
      if secret.contains(p.build_args) then
        return false, "build_args must not hold secrets: they are stored in the image's history"
      end
    end
    return true
  end,

  probe = function(h, p)
    local want_id, name = image_names(p)
    local snippets = { "docker image inspect --format " .. IMAGE_FMT .. " " .. quote(name or want_id) }
    if want_id then snippets[2] = "docker image inspect --format '{{.Id}}' " .. quote(want_id) end
    local res = h:batch(snippets)
    local problem = docker_problem(res[1])
    local st = { want_id = want_id, name = name, problem = problem }
    if problem then return st end
    if res[1].rc == 0 then
      local v = json.decode(trim(res[1].out))
      if type(v) ~= "table" then fail("cannot read docker image inspect: " .. tail(res[1].out, 3)) end
      st.id = v.Id
      st.labels = type(v.Labels) == "table" and v.Labels or {}
    elseif not res[1].out:find("No such image", 1, true) and not res[1].out:find("No such object", 1, true) then
      fail("docker image inspect " .. (name or want_id) .. ": " .. tail(res[1].out, 3))
    end
    st.have_id = res[2] and res[2].rc == 0
    if p.context and p.state == "present" then st.context_hash = context_hash(p) end
    return st
  end,

  diff = function(h, p, st)
    if st.problem and not h.check then
      if p.state == "absent" and st.problem == "docker is not installed" then return nil end
      fail(st.problem)
    end
    if p.state == "absent" then
      if not st.id then return nil end
      return { summary = "remove " .. p.name, fields = { state = "absent" } }
    end
    local note = st.problem and (" (" .. st.problem .. ")") or ""
    if p.tarball then
      if st.id == st.want_id then return nil end
      if st.have_id and st.name then
        return { summary = "tag " .. st.want_id:sub(1, 19) .. " as " .. st.name, tag_only = true,
          fields = { tag = st.name } }
      end
      return { summary = "load " .. p.tarball .. " (" .. st.want_id:sub(1, 19) .. ")" .. note,
        fields = { load = p.tarball, id = st.want_id } }
    end
    local have = st.labels and st.labels["kengine.context"]
    if st.id and have == st.context_hash then return nil end
    return { summary = (st.id and "rebuild " or "build ") .. p.name .. " from " .. p.context ..
      (st.id and " (context changed)" or "") .. note, fields = { build = p.context, context = st.context_hash } }
  end,

  apply = function(h, p, st, ch)
    if p.state == "absent" then
      local r = h:raw("docker image rm " .. quote(p.name))
      if r.code ~= 0 then fail("docker image rm " .. p.name .. ": " .. output_of(r)) end
      return
    end
    if p.tarball then
      if not ch.tag_only then
        with_upload(h, p.tarball, "image.tar", function(remote)
          local r = h:raw("docker load -q -i " .. quote(remote))
          if r.code ~= 0 then fail("docker load " .. p.tarball .. ": " .. output_of(r)) end
        end)
      end
      if st.name then
        local r = h:raw("docker tag " .. quote(st.want_id) .. " " .. quote(st.name))
        if r.code ~= 0 then fail("docker tag " .. st.name .. ": " .. output_of(r)) end
      end
      return
    end
    local tmp = local_tmp(".tar")
    local argv = { "tar" }
    for _, f in ipairs(TAR_FLAGS) do argv[#argv + 1] = f end
    for _, a in ipairs({ "-C", p.context, "-cf", tmp, "." }) do argv[#argv + 1] = a end
    local t = proc.exec(argv)
    if not t or t.code ~= 0 then
      os.remove(tmp)
      fail("cannot pack the build context " .. p.context .. ": " .. (t and trim(t.stderr) or ""))
    end
    local ok, err = pcall(with_upload, h, tmp, "context.tar", function(remote)
      local cmd = { "docker", "build", "-t", p.name, "--label", "kengine.context=" .. st.context_hash,
        "-f", p.dockerfile or "Dockerfile" }
      local names = {}
      for key in pairs(p.build_args or {}) do names[#names + 1] = key end
      table.sort(names)
      for _, key in ipairs(names) do
        cmd[#cmd + 1] = "--build-arg"
        cmd[#cmd + 1] = key .. "=" .. tostring(p.build_args[key])
      end
      if p.target then cmd[#cmd + 1] = "--target"; cmd[#cmd + 1] = p.target end
      for i, a in ipairs(cmd) do cmd[i] = quote(a) end
      local r = h:raw(table.concat(cmd, " ") .. " - < " .. quote(remote) .. " 2>&1")
      if r.code ~= 0 then fail("docker build " .. p.name .. " failed:\n" .. tail(r.stdout, 10)) end
    end)
    os.remove(tmp)
    if not ok then error(err, 0) end
  end,
}
M.docker_image.params_own = { name = true }

---------------------------------------------------------------------------
-- docker_container

local CONTAINER_FMT = [['{"Id":{{json .Id}},"Status":{{json .State.Status}},"Image":{{json .Image}},]] ..
  [["Labels":{{json .Config.Labels}}}']]
local SPEC_LABEL = "kengine.spec"
local NEW_SUFFIX = ".kengine-new"

local function as_list(v)
  if v == nil then return {} end
  if type(v) ~= "table" then return { v } end
  return v
end

-- "8080:80", "127.0.0.1:8080:80/udp", "[::1]:8080:80", "80" -> "ip:host:container/proto"
local function norm_port(spec, default_ip)
  spec = tostring(spec)
  local ip, rest = spec:match("^%[([%x:]+)%]:(.+)$")
  if ip then ip = "[" .. ip .. "]" else rest = spec end
  local proto = rest:match("/(%a+)$")
  rest = rest:gsub("/%a+$", "")
  local parts = {}
  for part in (rest .. ":"):gmatch("([^:]*):") do parts[#parts + 1] = part end
  local host, cport
  if #parts == 1 then
    host, cport = "", parts[1]
  elseif #parts == 2 then
    host, cport = parts[1], parts[2]
  elseif #parts == 3 and not ip then
    ip, host, cport = parts[1], parts[2], parts[3]
  else
    return nil
  end
  local range = "^%d+$"
  local range2 = "^%d+%-%d+$"
  if not (cport:match(range) or cport:match(range2)) then return nil end
  if host ~= "" and not (host:match(range) or host:match(range2)) then return nil end
  if proto and proto ~= "tcp" and proto ~= "udp" and proto ~= "sctp" then return nil end
  ip = ip or default_ip
  if ip == "" then ip = nil end
  proto = "/" .. (proto or "tcp")
  if ip then return ip .. ":" .. host .. ":" .. cport .. proto end
  if host ~= "" then return host .. ":" .. cport .. proto end
  return cport .. proto
end
M.norm_port = norm_port

local function restart_of(p) return p.restart or p.restart_policy or "no" end

local function caps(list)
  local out = {}
  for i, c in ipairs(as_list(list)) do out[i] = tostring(c):upper():gsub("^CAP_", "") end
  table.sort(out)
  return out
end

local function sorted(list)
  local out = {}
  for i, v in ipairs(as_list(list)) do out[i] = tostring(v) end
  table.sort(out)
  return out
end

-- the normalized spec: everything that, when changed, re-creates the container
local function container_spec(p)
  local ports = {}
  for i, s in ipairs(as_list(p.ports)) do ports[i] = norm_port(s, p.default_host_ip) end
  table.sort(ports)
  local env = {}
  for key, v in pairs(p.env or {}) do env[key] = secret.reveal(v) end
  return {
    v = 1, image = p.image, command = p.command, entrypoint = p.entrypoint, env = env, ports = ports,
    volumes = sorted(p.volumes), restart = restart_of(p), cap_add = caps(p.capabilities), cap_drop = caps(p.cap_drop),
    privileged = p.privileged and true or false, labels = p.labels or {}, hostname = p.hostname,
    network = p.network, user = p.user, working_dir = p.working_dir, extra_args = p.extra_args,
  }
end

--- The spec hash stored in the container's kengine.spec label.
function M.spec_hash(p) return M.sha256(canon(container_spec(p))) end

local function words_or_list(v)
  if type(v) == "table" then
    local out = {}
    for i, a in ipairs(v) do out[i] = quote(a) end
    return table.concat(out, " ")
  end
  return v -- a string: shell words, parsed by the target's shell like a command line
end

local function create_command(p, name, hash, env_file)
  local a = { "docker", "create", "--name", name, "--label", SPEC_LABEL .. "=" .. hash,
    "--restart", restart_of(p) }
  local function add(...) for i = 1, select("#", ...) do a[#a + 1] = (select(i, ...)) end end
  local lnames = {}
  for key in pairs(p.labels or {}) do lnames[#lnames + 1] = key end
  table.sort(lnames)
  for _, key in ipairs(lnames) do add("--label", key .. "=" .. tostring(p.labels[key])) end
  for _, s in ipairs(as_list(p.ports)) do add("--publish", norm_port(s, p.default_host_ip)) end
  for _, v in ipairs(as_list(p.volumes)) do add("--volume", tostring(v)) end
  for _, c in ipairs(caps(p.capabilities)) do add("--cap-add", c) end
  for _, c in ipairs(caps(p.cap_drop)) do add("--cap-drop", c) end
  if p.privileged then add("--privileged") end
  if p.hostname then add("--hostname", p.hostname) end
  if p.network then add("--network", p.network) end
  if p.user then add("--user", tostring(p.user)) end
  if p.working_dir then add("--workdir", p.working_dir) end
  local entry_rest
  if p.entrypoint ~= nil then
    local e = type(p.entrypoint) == "table" and p.entrypoint or { p.entrypoint }
    add("--entrypoint", e[1] or "")
    entry_rest = {}
    for i = 2, #e do entry_rest[#entry_rest + 1] = e[i] end
  end
  for _, x in ipairs(as_list(p.extra_args)) do add(tostring(x)) end
  local line = {}
  for i, x in ipairs(a) do line[i] = quote(x) end
  if env_file then line[#line + 1] = "--env-file \"$f\"" end
  line[#line + 1] = quote(p.image)
  -- entrypoint given as a list: its arguments come before the command
  if entry_rest and #entry_rest > 0 then line[#line + 1] = words_or_list(entry_rest) end
  if p.command ~= nil then line[#line + 1] = words_or_list(p.command) end
  return table.concat(line, " ")
end

local function env_content(p)
  local names = {}
  for key in pairs(p.env or {}) do names[#names + 1] = key end
  if #names == 0 then return nil end
  table.sort(names)
  local lines = {}
  for _, key in ipairs(names) do lines[#lines + 1] = key .. "=" .. tostring(secret.reveal(p.env[key])) end
  return table.concat(lines, "\n") .. "\n"
end

local STATES = { started = true, stopped = true, absent = true }
local RESTARTS = { no = true, always = true, ["unless-stopped"] = true, ["on-failure"] = true }

M.docker_container = recipe.resource {
  name = "docker_container",
  description = "a Docker container, re-created only when its spec changed",
  defaults = { state = "started", default_host_ip = "0.0.0.0", stop_timeout = 10 },
  label = function(p) return p.name end,
  validate = function(p)
    if type(p.name) ~= "string" or not p.name:match("^[%w][%w_.%-]*$") then
      return false, "name must be a container name ([a-zA-Z0-9][a-zA-Z0-9_.-]*)"
    end
    if not STATES[p.state] then return false, "state must be 'started', 'stopped' or 'absent'" end
    if p.state ~= "absent" and (type(p.image) ~= "string" or p.image == "") then return false, "image is required" end
    if p.env ~= nil then
      if type(p.env) ~= "table" then return false, "env must be a table of NAME = value" end
      for key, v in pairs(p.env) do
        if type(key) ~= "string" or not key:match("^[%a_][%w_]*$") then
          return false, "env: invalid variable name '" .. tostring(key) .. "'"
        end
        local s = secret.reveal(v)
        if type(s) ~= "string" and type(s) ~= "number" and type(s) ~= "boolean" then
          return false, "env " .. key .. ": a string, number or secret expected"
        end
        if tostring(s):find("\n", 1, true) then return false, "env " .. key .. ": values cannot hold newlines" end
      end
    end
    for _, f in ipairs({ "command", "entrypoint", "labels", "volumes", "ports", "extra_args", "hostname", "user",
      "image", "network", "working_dir" }) do
      if secret.contains(p[f]) then
        return false, f .. " must not hold a secret: it would be visible in ps and docker inspect (use env)"
      end
    end
    for _, s in ipairs(as_list(p.ports)) do
      if not norm_port(s, p.default_host_ip) then return false, "invalid port '" .. tostring(s) .. "'" end
    end
    local r = restart_of(p)
    if type(r) ~= "string" or not (RESTARTS[r] or r:match("^on%-failure:%d+$")) then
      return false, "restart must be 'no', 'always', 'unless-stopped', 'on-failure' or 'on-failure:N'"
    end
    if p.labels ~= nil and type(p.labels) ~= "table" then return false, "labels must be a table" end
    if p.labels and p.labels[SPEC_LABEL] then return false, "the label " .. SPEC_LABEL .. " is kengine's own" end
    if math.type(p.stop_timeout) ~= "integer" or p.stop_timeout < 0 then
      return false, "stop_timeout must be a whole number of seconds"
    end
    return true
  end,

  probe = function(h, p)
    local snippets = { "docker inspect --type container --format " .. CONTAINER_FMT .. " " .. quote(p.name) }
    if p.state ~= "absent" then snippets[2] = "docker image inspect --format '{{.Id}}' " .. quote(p.image) end
    local res = h:batch(snippets)
    local problem = docker_problem(res[1])
    if problem then return { problem = problem } end
    local st = { exists = false }
    if res[1].rc == 0 then
      local v = json.decode(trim(res[1].out))
      if type(v) ~= "table" then fail("cannot read docker inspect " .. p.name .. ": " .. tail(res[1].out, 3)) end
      st.exists, st.id, st.status, st.image_id = true, v.Id, v.Status, v.Image
      st.spec = type(v.Labels) == "table" and v.Labels[SPEC_LABEL] or nil
    elseif not res[1].out:find("No such container", 1, true) and not res[1].out:find("No such object", 1, true) then
      fail("docker inspect " .. p.name .. ": " .. tail(res[1].out, 3))
    end
    if res[2] and res[2].rc == 0 then st.want_image_id = trim(res[2].out) end
    return st
  end,

  diff = function(h, p, st)
    if st.problem then
      if p.state == "absent" and st.problem == "docker is not installed" then return nil end
      if not h.check then fail(st.problem) end
      if p.state == "absent" then return nil end
      return { summary = "create " .. (p.state == "started" and "and start " or "") .. "(" .. st.problem .. ")",
        fields = { create = true } }
    end
    if p.state == "absent" then
      if not st.exists then return nil end
      return { summary = "remove container " .. st.id:sub(1, 12), remove = true, fields = { state = "absent" } }
    end
    local hash = M.spec_hash(p)
    local why
    if not st.exists then
      why = "create"
    elseif st.spec ~= hash then
      why = "re-create (spec changed)"
    elseif st.want_image_id and st.image_id ~= st.want_image_id then
      why = "re-create (image " .. p.image .. " changed)"
    end
    local running = st.status == "running" or st.status == "restarting"
    if why then
      return { summary = why .. (p.state == "started" and " and start" or ""), create = true, hash = hash,
        fields = { create = true, spec = hash } }
    end
    if p.state == "started" and not running then
      return { summary = st.status == "paused" and "unpause" or "start", start = true,
        fields = { status = { st.status, "running" } } }
    end
    if p.state == "stopped" and (running or st.status == "paused") then
      return { summary = "stop", stop = true, fields = { status = { st.status, "exited" } } }
    end
    return nil
  end,

  apply = function(h, p, st, ch)
    local name = quote(p.name)
    local stop = "docker stop -t " .. p.stop_timeout .. " " .. name .. " >/dev/null"
    if ch.remove then
      local r = h:raw(stop .. "; docker rm -f " .. name .. " >/dev/null")
      if r.code ~= 0 then fail("docker rm " .. p.name .. ": " .. output_of(r)) end
      return
    end
    if ch.start then
      local r = h:raw((st.status == "paused" and "docker unpause " or "docker start ") .. name .. " >/dev/null")
      if r.code ~= 0 then fail("docker start " .. p.name .. ": " .. output_of(r)) end
      return
    end
    if ch.stop then
      local r = h:raw(stop)
      if r.code ~= 0 then fail("docker stop " .. p.name .. ": " .. output_of(r)) end
      return
    end
    -- create the new container under a temporary name first: if that fails
    -- (bad image, bad option) the old one is left running untouched
    local env = env_content(p)
    local tmp = quote(p.name .. NEW_SUFFIX)
    local lines = { "docker rm -f " .. tmp .. " >/dev/null 2>&1" }
    if env then
      lines[#lines + 1] = "umask 077; f=$(mktemp \"${TMPDIR:-/tmp}/kengine-env.XXXXXXXX\") || exit 1"
      lines[#lines + 1] = "trap 'rm -f \"$f\"' EXIT"
      lines[#lines + 1] = "cat > \"$f\" || exit 1"
    end
    lines[#lines + 1] = "new=$(" .. create_command(p, p.name .. NEW_SUFFIX, ch.hash, env ~= nil) .. ") || exit 3"
    if env then lines[#lines + 1] = "rm -f \"$f\"" end
    if st.exists then
      lines[#lines + 1] = stop .. " 2>&1; docker rm -f " .. name ..
        " >/dev/null || { docker rm -f \"$new\" >/dev/null 2>&1; exit 4; }"
    end
    lines[#lines + 1] = "docker rename \"$new\" " .. name .. " || exit 4"
    if p.state == "started" then lines[#lines + 1] = "docker start " .. name .. " >/dev/null || exit 5" end
    lines[#lines + 1] = "echo \"$new\""
    local r = h:raw(table.concat(lines, "\n"), { stdin = env })
    if r.code == 3 then fail("docker create " .. p.name .. ": " .. output_of(r)) end
    if r.code == 5 then fail("docker start " .. p.name .. ": " .. output_of(r)) end
    if r.code ~= 0 then fail("cannot replace container " .. p.name .. ": " .. output_of(r)) end
    return { id = trim(r.stdout) }
  end,
}
M.docker_container.params_own = { name = true }

return M
