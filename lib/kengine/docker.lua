--- A small Docker Engine API client over the daemon's unix socket.
--
-- Everything goes through `kengine.http` (libcurl with `unix_socket`), so
-- each call yields to the engine loop like any other HTTP request; the
-- `docker` CLI is never run.
--
--   local docker = require "kengine.docker"
--   local d = docker.new()                    -- /var/run/docker.sock, API v1.41
--   assert(d:ping())
--   local id = assert(d:container_create({ Image = "debian" }, { name = "x" }))
--
-- Every method returns its value, or `nil, "CODE: message", "CODE"` (plus
-- the HTTP status as a fourth value for API errors).  Codes:
--
-- * `ENOENT`       Docker is not installed (no socket, no `dockerd`)
-- * `ECONNREFUSED` Docker is installed but not running (socket missing or refusing)
-- * `ENOTFOUND`    the API answered 404 (no such image, container, exec)
-- * `ECONFLICT`    the API answered 409 (name in use, container running …)
-- * `EAPI`         any other API error; the message has the status and the daemon's message
-- * `ETIMEDOUT`, `EPROTO` … from kengine.http for transport failures
--
-- API version 1.41 (Docker 20.10, Debian 12's docker.io) is the default;
-- newer daemons accept it too.
-- @module kengine.docker
local http = require "kengine.http"
local json = require "kengine.json"

local concat, format, pack, unpack = table.concat, string.format, string.pack, string.unpack

local M = {}

M.DEFAULT_SOCKET = "/var/run/docker.sock"
M.DEFAULT_API = "v1.41"

local Client = {}
Client.__index = Client

--- The socket named by DOCKER_HOST (unix:// only), else the default.
local function default_socket()
  local dh = os.getenv("DOCKER_HOST")
  if dh and dh ~= "" then
    local path = dh:match("^unix://(.+)$")
    if path then return path end
  end
  return M.DEFAULT_SOCKET
end

--- A client.
-- @tparam[opt] table opts `socket` (default DOCKER_HOST's unix path or
-- /var/run/docker.sock), `api` (default "v1.41"), `timeout` (seconds, default 60)
function M.new(opts)
  opts = opts or {}
  return setmetatable({
    socket = opts.socket or default_socket(),
    api = opts.api or M.DEFAULT_API,
    timeout = opts.timeout or 60,
  }, Client)
end

-- ---- helpers ---------------------------------------------------------------

local function urlencode(s)
  return (tostring(s):gsub("[^%w%-%._~]", function(c) return format("%%%02X", c:byte()) end))
end

--- Query string from {key = value | {values…}}; keys sorted so URLs are stable.
local function query(q)
  if not q then return "" end
  local keys, parts = {}, {}
  for key in pairs(q) do keys[#keys + 1] = key end
  table.sort(keys)
  for _, key in ipairs(keys) do
    local v = q[key]
    if type(v) == "table" then
      for _, x in ipairs(v) do parts[#parts + 1] = urlencode(key) .. "=" .. urlencode(x) end
    elseif v ~= nil and v ~= false then
      parts[#parts + 1] = urlencode(key) .. "=" .. urlencode(v == true and "1" or v)
    end
  end
  if #parts == 0 then return "" end
  return "?" .. concat(parts, "&")
end
M.query = query

local function exists(path)
  local f, _, errno = io.open(path, "rb")
  if f then f:close(); return true end
  return errno ~= 2 -- anything but ENOENT (a socket gives ENXIO) means it is there
end

local function dockerd_installed()
  for dir in (os.getenv("PATH") or "/usr/sbin:/usr/bin:/sbin:/bin"):gmatch("[^:]+") do
    if exists(dir .. "/dockerd") then return true end
  end
  return exists("/usr/bin/dockerd") or exists("/usr/sbin/dockerd")
end

--- Turn a transport failure on the socket into "not installed" / "not running".
function Client:transport_error(msg, code)
  if code == "ENOENT" or code == "ECONNREFUSED" then
    if not exists(self.socket) and not dockerd_installed() then
      return nil, format("ENOENT: Docker is not installed: no %s and no dockerd in PATH", self.socket),
        "ENOENT"
    end
    if not exists(self.socket) then
      return nil, format("ECONNREFUSED: Docker is not running: no socket at %s", self.socket), "ECONNREFUSED"
    end
    return nil, format("ECONNREFUSED: Docker is not running: nothing answers on %s", self.socket),
      "ECONNREFUSED"
  end
  return nil, msg, code
end

local CODES = { [404] = "ENOTFOUND", [409] = "ECONFLICT" }

--- The daemon's message from an error body ({"message": "..."}), else the body.
local function daemon_message(body)
  local v = json.decode(body or "")
  if type(v) == "table" and type(v.message) == "string" then return v.message end
  body = (body or ""):gsub("%s+$", "")
  return body ~= "" and body or "(no message)"
end

--- One API call.
-- @param method "GET", "POST" …
-- @param path "/containers/json" (without the version prefix)
-- @param opts `query`, `json` (a Lua value to encode), `body` (raw string),
-- `content_type`, `timeout`, `raw` (return the response instead of decoding JSON)
-- @return decoded JSON body (or true when empty; the response with `raw`),
-- or nil, string, string, status
function Client:call(method, path, opts)
  opts = opts or {}
  local headers = {}
  local body = opts.body
  if opts.json ~= nil then
    body = json.encode(opts.json)
    headers["Content-Type"] = "application/json"
  elseif body then
    headers["Content-Type"] = opts.content_type or "application/octet-stream"
  end
  local url = "http://localhost/" .. self.api .. path .. query(opts.query)
  local res, err, code = http.request {
    method = method, url = url, headers = headers, body = body,
    unix_socket = self.socket, timeout = opts.timeout or self.timeout,
  }
  if not res then return self:transport_error(err, code) end
  if res.status >= 400 then
    local c = CODES[res.status] or "EAPI"
    return nil, format("%s: docker %s %s: %d %s", c, method, path, res.status, daemon_message(res.body)),
      c, res.status
  end
  if opts.raw then return res end
  if res.body == "" then return true end
  local v, jerr = json.decode(res.body)
  if v == nil then return nil, jerr, "EPROTO" end
  return v
end

--- Parse a JSON-lines progress stream (pull, import): the last status, or the
-- first error the daemon reported in the stream (those come with status 200).
local function progress(body, what)
  local last
  for line in body:gmatch("[^\r\n]+") do
    local v = json.decode(line)
    if type(v) == "table" then
      if v.error or v.errorDetail then
        local msg = v.error or (v.errorDetail and v.errorDetail.message) or "unknown error"
        return nil, "EAPI: docker " .. what .. ": " .. msg, "EAPI"
      end
      last = v
    end
  end
  return last or true
end

-- ---- system -----------------------------------------------------------------

--- GET /_ping. @return true or nil, string, string
function Client:ping()
  local res, err, code = self:call("GET", "/_ping", { raw = true, timeout = 10 })
  if not res then return nil, err, code end
  return true
end

--- GET /version: {Version=, ApiVersion=, Os=, Arch=, …}
function Client:version()
  return self:call("GET", "/version", { timeout = 10 })
end

--- GET /info
function Client:info()
  return self:call("GET", "/info", { timeout = 10 })
end

-- ---- images -----------------------------------------------------------------

--- GET /images/{name}/json. ENOTFOUND when the image is not there.
function Client:image_inspect(name)
  return self:call("GET", "/images/" .. urlencode(name) .. "/json")
end

--- GET /images/json, optionally filtered: opts.reference ("kengine-lab"), opts.label ("k=v").
function Client:images(opts)
  opts = opts or {}
  local filters = {}
  if opts.reference then filters.reference = { opts.reference } end
  if opts.label then filters.label = { opts.label } end
  return self:call("GET", "/images/json", { query = { filters = next(filters) and json.encode(filters) } })
end

--- Import a root filesystem tarball as an image (`docker import`).
-- The tarball (plain, gzip, bzip2 or xz) is sent as the request body, so it
-- is held in memory once here and once by libcurl.
-- @param tarball the archive's bytes
-- @param opts `repo`, `tag`, `changes` (Dockerfile instructions such as
-- `CMD ["/sbin/init"]`), `message`, `timeout` (default 600)
-- @return the image id or nil, string, string
function Client:image_import(tarball, opts)
  opts = opts or {}
  local res, err, code = self:call("POST", "/images/create", {
    query = { fromSrc = "-", repo = opts.repo, tag = opts.tag, changes = opts.changes, message = opts.message },
    body = tarball, content_type = "application/x-tar", timeout = opts.timeout or 600, raw = true,
  })
  if not res then return nil, err, code end
  local last, perr, pcode = progress(res.body, "import")
  if not last then return nil, perr, pcode end
  return type(last) == "table" and last.status or true
end

--- Pull an image (`docker pull`). @param name "debian:bookworm" or "debian"
-- @return true or nil, string, string
function Client:image_pull(name, opts)
  opts = opts or {}
  local image, tag = name:match("^(.-):([%w][%w_.%-]*)$")
  if not image then image, tag = name, "latest" end
  local res, err, code = self:call("POST", "/images/create", {
    query = { fromImage = image, tag = tag }, timeout = opts.timeout or 900, raw = true,
  })
  if not res then return nil, err, code end
  local last, perr, pcode = progress(res.body, "pull " .. name)
  if not last then return nil, perr, pcode end
  return true
end

--- DELETE /images/{name}
function Client:image_remove(name, opts)
  opts = opts or {}
  return self:call("DELETE", "/images/" .. urlencode(name), { query = { force = opts.force } })
end

-- ---- containers ---------------------------------------------------------------

--- GET /containers/json.
-- @param opts `all` (include stopped), `labels` (list of "k" or "k=v"), `name`
function Client:containers(opts)
  opts = opts or {}
  local filters = {}
  if opts.labels then filters.label = opts.labels end
  if opts.name then filters.name = { opts.name } end
  return self:call("GET", "/containers/json", {
    query = { all = opts.all and "1" or nil, filters = next(filters) and json.encode(filters) },
  })
end

--- POST /containers/create. @param spec the API's container config
-- @param opts `name` @return the container id or nil, string, string
function Client:container_create(spec, opts)
  opts = opts or {}
  local v, err, code, status = self:call("POST", "/containers/create", { query = { name = opts.name }, json = spec })
  if not v then return nil, err, code, status end
  return v.Id
end

--- POST /containers/{id}/start (already running is not an error)
function Client:container_start(id)
  local res, err, code, status = self:call("POST", "/containers/" .. urlencode(id) .. "/start", { raw = true })
  if not res then return nil, err, code, status end
  return true
end

--- POST /containers/{id}/stop. @param opts `t` seconds before SIGKILL (default 10)
function Client:container_stop(id, opts)
  opts = opts or {}
  local t = opts.t or 10
  local res, err, code, status = self:call("POST", "/containers/" .. urlencode(id) .. "/stop",
    { query = { t = t }, raw = true, timeout = t + 30 })
  if not res then return nil, err, code, status end
  return true
end

--- DELETE /containers/{id}. @param opts `force` (kill a running one), `volumes`
function Client:container_remove(id, opts)
  opts = opts or {}
  local res, err, code, status = self:call("DELETE", "/containers/" .. urlencode(id),
    { query = { force = opts.force, v = opts.volumes }, raw = true })
  if not res then return nil, err, code, status end
  return true
end

--- GET /containers/{id}/json
function Client:container_inspect(id)
  return self:call("GET", "/containers/" .. urlencode(id) .. "/json")
end

--- PUT /containers/{id}/archive: extract a tar archive into the container's
-- filesystem at path (works on created, not yet started containers too).
function Client:put_archive(id, path, tarball)
  local res, err, code, status = self:call("PUT", "/containers/" .. urlencode(id) .. "/archive", {
    query = { path = path }, body = tarball, content_type = "application/x-tar", raw = true,
  })
  if not res then return nil, err, code, status end
  return true
end

--- POST /commit: an image from a container (`docker commit`).
-- @param opts `repo`, `tag`, `changes`, `comment`
function Client:commit(id, opts)
  opts = opts or {}
  local v, err, code, status = self:call("POST", "/commit", {
    query = { container = id, repo = opts.repo, tag = opts.tag, changes = opts.changes, comment = opts.comment },
    json = {}, timeout = opts.timeout or 600,
  })
  if not v then return nil, err, code, status end
  return v.Id
end

-- ---- exec -----------------------------------------------------------------------

--- POST /containers/{id}/exec. @return the exec id
function Client:exec_create(id, cmd, opts)
  opts = opts or {}
  local env
  if opts.env then
    env = {}
    for name, v in pairs(opts.env) do env[#env + 1] = name .. "=" .. tostring(v) end
    table.sort(env)
  end
  local v, err, code, status = self:call("POST", "/containers/" .. urlencode(id) .. "/exec", {
    json = { Cmd = cmd, Env = env, User = opts.user, WorkingDir = opts.cwd,
             AttachStdout = true, AttachStderr = true, Tty = false },
  })
  if not v then return nil, err, code, status end
  return v.Id
end

--- Split Docker's multiplexed stream (8-byte frame headers) into stdout, stderr.
function M.demux(raw)
  local out, err, pos, n = {}, {}, 1, #raw
  while pos + 7 <= n do
    local kind, size = unpack(">B xxx I4", raw, pos)
    local chunk = raw:sub(pos + 8, pos + 7 + size)
    if kind == 2 then err[#err + 1] = chunk else out[#out + 1] = chunk end
    pos = pos + 8 + size
  end
  return concat(out), concat(err)
end

--- POST /exec/{id}/start, attached: waits for the command to end.
-- @return stdout, stderr or nil, string, string
function Client:exec_start(exec_id, opts)
  opts = opts or {}
  local res, err, code, status = self:call("POST", "/exec/" .. urlencode(exec_id) .. "/start", {
    json = { Detach = false, Tty = false }, raw = true, timeout = opts.timeout or 600,
  })
  if not res then return nil, err, code, status end
  return M.demux(res.body)
end

--- GET /exec/{id}/json
function Client:exec_inspect(exec_id)
  return self:call("GET", "/exec/" .. urlencode(exec_id) .. "/json")
end

--- Run a command inside a running container, like `docker exec`.
-- @param cmd argv list
-- @param opts `env`, `user`, `cwd`, `timeout` (seconds, default 600)
-- @return {code=, stdout=, stderr=} or nil, string, string
function Client:exec(id, cmd, opts)
  local eid, err, code = self:exec_create(id, cmd, opts)
  if not eid then return nil, err, code end
  local out, serr, scode = self:exec_start(eid, opts)
  if not out then return nil, serr, scode end
  local info, ierr, icode = self:exec_inspect(eid)
  if not info then return nil, ierr, icode end
  return { code = math.tointeger(info.ExitCode) or info.ExitCode, stdout = out, stderr = serr }
end

-- ---- tar ------------------------------------------------------------------------

local function octal(n, width)
  return format("%0" .. (width - 1) .. "o", n) .. "\0"
end

--- A ustar archive from a list of entries {name=, content= | dir=true, mode=}
-- (owner root, for put_archive).  Names are relative ("etc/ssh/key").
function M.tar(entries)
  local out = {}
  for _, e in ipairs(entries) do
    local name = e.dir and (e.name:gsub("/?$", "/")) or e.name
    local content = e.dir and "" or e.content
    assert(#name <= 100, "tar: name longer than 100 bytes: " .. name)
    local mode = tonumber(e.mode or (e.dir and "0755" or "0644"), 8)
    local head = pack("c100 c8 c8 c8 c12 c12 c8 c1 c100 c6 c2 c32 c32 c8 c8 c155 c12",
      name, octal(mode, 8), octal(0, 8), octal(0, 8), octal(#content, 12), octal(e.mtime or 0, 12),
      "        ", e.dir and "5" or "0", "", "ustar\0", "00", "root", "root", octal(0, 8), octal(0, 8), "", "")
    local sum = 0
    for i = 1, #head do sum = sum + head:byte(i) end
    head = head:sub(1, 148) .. format("%06o\0 ", sum) .. head:sub(157)
    out[#out + 1] = head
    out[#out + 1] = content
    local pad = (512 - #content % 512) % 512
    out[#out + 1] = ("\0"):rep(pad)
  end
  out[#out + 1] = ("\0"):rep(1024)
  return concat(out)
end

return M
