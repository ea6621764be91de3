--- `kengine lab`: disposable Debian hosts as Docker containers.
--
-- Each lab host runs sshd in the foreground (there is no systemd in a lab
-- host), has its SSH, HTTP and HTTPS ports published on 127.0.0.1 only, trusts
-- the lab's own ED25519 key for root, and has a host key generated here and
-- copied into the container before it starts, so the lab's known_hosts file
-- is right from the first connection (no trust on first use).  Containers get
-- the capability set that lets Docker run inside them (DESIGN, "The lab").
--
-- All Docker work goes through kengine.docker (the Engine API over the unix
-- socket).  Local tools: debootstrap and tar (for `lab image`), ssh-keygen,
-- and ssh (for `lab ssh`).
-- @module kengine.lab
local k = require "kengine"
local docker = require "kengine.docker"

local format, concat = string.format, table.concat

local M = {}

M.DEFAULT_IMAGE = "kengine-lab:bookworm"
M.DEFAULT_NAME = "lab"
M.SUITE = "bookworm"
M.PACKAGES = { "openssh-server", "python3", "sudo", "curl", "iproute2", "procps", "ca-certificates" }
M.LABEL = "io.kengine.lab"            -- value: the lab's name
M.LABEL_HOST = "io.kengine.lab.host"  -- value: the host's name (LAB-i)
M.LABEL_INDEX = "io.kengine.lab.index"
M.PORTS = { ssh = "22/tcp", http = "80/tcp", https = "443/tcp" }
M.SSH_WAIT = 90      -- seconds for every host's sshd to answer after `up`
M.BUILD_TIMEOUT = 1800

--- What Docker inside a lab host needs (verified on these machines; --privileged fails here).
M.CAPS = { "SYS_ADMIN", "NET_ADMIN", "NET_RAW", "MKNOD", "SYS_CHROOT", "SETFCAP", "AUDIT_WRITE",
           "SYS_PTRACE", "SYS_MODULE", "DAC_READ_SEARCH", "IPC_LOCK", "SYS_NICE" }
M.SECURITY_OPT = { "seccomp=unconfined", "apparmor=unconfined" }
M.BINDS = { "/sys/fs/cgroup:/sys/fs/cgroup:rw" }
-- Docker's tmpfs defaults to noexec; an inner daemon runs binaries from here
M.TMPFS = { ["/var/lib/docker"] = "rw,exec,dev,suid,mode=0711" }

M.HELP = [[
usage: kengine lab COMMAND [OPTIONS]

Disposable Debian hosts as Docker containers, reachable over SSH on
127.0.0.1, with an inventory file for `kengine run -i`.

commands:
  image [--from IMAGE] [--rebuild] [--mirror URL]
                         build the lab image kengine-lab:bookworm with debootstrap
                         (mirror from this machine's apt sources), or from a
                         base IMAGE; skipped when the image exists
  up [N] [--name LAB]    start N hosts (default 1) named LAB-1..LAB-N (LAB
                         defaults to "lab"); hosts above N are removed
  status [--name LAB]    hosts, state and published ports
  ssh HOST [--name LAB] [-- CMD...]
                         ssh to a host as root (HOST: LAB-2, or just 2)
  down [--name LAB]      remove the hosts, the lab's keys and files
  inventory [--name LAB] print the path of the lab's inventory file

options:
  --name LAB      lab name (default "lab")
  --image IMAGE   lab image (default kengine-lab:bookworm; env KENGINE_LAB_IMAGE)

Files live in $KENGINE_LAB_DIR/LAB (default ~/.kengine/labs/LAB): the lab's
key id_ed25519, known_hosts, inventory.lua. Docker must be running
(/var/run/docker.sock).
]]

-- ---- output -------------------------------------------------------------------

local function say(...)
  io.stdout:write(...)
  io.stdout:write("\n")
  io.stdout:flush()
end

local function fail(msg)
  -- messages from kengine.docker start with their code: users want the words
  msg = tostring(msg):gsub("^E%u+: ", "")
  io.stderr:write("kengine lab: ", msg, "\n")
  return 1
end

local function usage_error(msg)
  io.stderr:write("kengine lab: ", msg, "\n", "Try 'kengine lab --help'.\n")
  return 2
end

local function trim(s) return (tostring(s or ""):gsub("^%s+", ""):gsub("%s+$", "")) end

local function run(argv, opts)
  local r, err = k.exec(argv, opts)
  if not r then return nil, err end
  if r.code ~= 0 then
    return nil, format("%s failed (exit %d): %s", argv[1], r.code, trim(r.stderr ~= "" and r.stderr or r.stdout))
  end
  return r
end

local function exists(path)
  local f = io.open(path, "rb")
  if f then f:close() return true end
  return false
end

--- Run fn(item) for every item at once; fn returns an error message or nil.
-- @return nil when all succeeded, else the messages (also of tasks that raised), one a line
local function each(list, fn)
  local failed, raised = k.parallel(list, fn)
  local msgs = {}
  for i = 1, #list do
    local m = failed[i] or (raised and raised[i])
    if m then msgs[#msgs + 1] = tostring(m) end
  end
  if #msgs == 0 then return nil end
  return concat(msgs, "\n")
end

-- ---- apt sources -----------------------------------------------------------------

local function split_words(s)
  local t = {}
  for w in (s or ""):gmatch("%S+") do t[#t + 1] = w end
  return t
end

--- Entries of a one-line-style sources.list: {types=, uris=, suites=, components=}
function M.parse_sources_list(text)
  local entries = {}
  for line in text:gmatch("[^\n]+") do
    line = line:gsub("#.*", "")
    local typ, rest = line:match("^%s*(deb%S*)%s+(.*)$")
    if typ then
      rest = rest:gsub("^%[.-%]%s*", "") -- [arch=amd64 signed-by=…]
      local w = split_words(rest)
      if w[1] and w[2] then
        entries[#entries + 1] = { types = { typ }, uris = { w[1] }, suites = { w[2] },
                                  components = { table.unpack(w, 3) } }
      end
    end
  end
  return entries
end

--- Entries of a deb822 .sources file (paragraphs of Field: value, continuation lines indented).
function M.parse_deb822(text)
  local entries, fields, last = {}, {}, nil
  local function flush()
    if next(fields) and (fields.enabled or "yes"):lower() ~= "no" then
      entries[#entries + 1] = { types = split_words(fields.types), uris = split_words(fields.uris),
                                suites = split_words(fields.suites),
                                components = split_words(fields.components) }
    end
    fields, last = {}, nil
  end
  for line in (text .. "\n"):gmatch("(.-)\n") do
    if line:match("^#") then -- comment lines do not end a paragraph
      goto continue
    elseif line:match("^%s*$") then
      flush()
    elseif line:match("^%s") and last then
      fields[last] = fields[last] .. " " .. trim(line)
    else
      local name, value = line:match("^([%w%-]+):%s*(.-)%s*$")
      if name then
        last = name:lower()
        fields[last] = value
      end
    end
    ::continue::
  end
  flush()
  return entries
end

--- Every apt source entry of this machine, in apt's order.
function M.apt_sources(root)
  root = root or ""
  local entries = {}
  local function add(list) for _, e in ipairs(list) do entries[#entries + 1] = e end end
  local main = k.read_file(root .. "/etc/apt/sources.list")
  if main then add(M.parse_sources_list(main)) end
  local r = k.exec({ "sh", "-c", 'for f in "$1"/*.list "$1"/*.sources; do [ -f "$f" ] && echo "$f"; done; true',
                     "sh", root .. "/etc/apt/sources.list.d" })
  local files = {}
  for f in (r and r.stdout or ""):gmatch("[^\n]+") do files[#files + 1] = f end
  table.sort(files)
  for _, f in ipairs(files) do
    local text = k.read_file(f)
    if text then
      if f:match("%.sources$") then add(M.parse_deb822(text)) else add(M.parse_sources_list(text)) end
    end
  end
  return entries
end

local function has(list, x)
  for _, v in ipairs(list) do if v == x then return true end end
  return false
end

local function usable_uri(uris)
  for _, u in ipairs(uris) do
    if u:match("^https?://") then return (u:gsub("/+$", "")) end
  end
  return nil
end

--- The Debian mirror and extra suites for SUITE from this machine's apt sources.
-- @return {mirror=URI, components={…}, extra={ {uri=, suite=, components=}… }} or nil, string
function M.debian_sources(suite, entries)
  suite = suite or M.SUITE
  entries = entries or M.apt_sources()
  local found = { extra = {} }
  for _, e in ipairs(entries) do
    local uri = usable_uri(e.uris)
    if uri and has(e.types, "deb") and has(e.components, "main") then
      for _, s in ipairs(e.suites) do
        if s == suite and not found.mirror then
          found.mirror, found.components = uri, e.components
        elseif s:sub(1, #suite + 1) == suite .. "-" then
          found.extra[#found.extra + 1] = { uri = uri, suite = s, components = e.components }
        end
      end
    end
  end
  if not found.mirror then
    return nil, format("no Debian mirror for '%s' (a deb entry with component main) in /etc/apt/sources.list "
      .. "or /etc/apt/sources.list.d/: pass --mirror URL", suite)
  end
  return found
end

-- ---- paths, names ----------------------------------------------------------------------

local function home()
  return k.getenv("HOME") or "/root"
end

--- The directory holding every lab's files.
function M.base_dir()
  local d = k.getenv("KENGINE_LAB_DIR")
  if d and d ~= "" then return d end
  return home() .. "/.kengine/labs"
end

function M.lab_dir(name) return M.base_dir() .. "/" .. name end

local function valid_name(name)
  -- container names and host names both: LAB-N must be a valid hostname
  return name:match("^[a-z0-9][a-z0-9%-]*$") ~= nil and #name <= 40
end

local function image_name(opts)
  return opts.image or k.getenv("KENGINE_LAB_IMAGE") or M.DEFAULT_IMAGE
end

local function paths(name)
  local dir = M.lab_dir(name)
  return {
    dir = dir,
    identity = dir .. "/id_ed25519",
    known_hosts = dir .. "/known_hosts",
    inventory = dir .. "/inventory.lua",
    hostkeys = dir .. "/hostkeys",
  }
end

-- ---- docker --------------------------------------------------------------------------

local function client()
  local d = docker.new()
  local ok, err = d:ping()
  if not ok then
    if err:match("not running") then
      err = err .. " (start it: `service docker start`, or tests/support/dockerd.sh in a source tree)"
    elseif err:match("not installed") then
      err = err .. " (apt-get install docker.io)"
    end
    return nil, err
  end
  return d
end

--- The lab's containers, sorted by index: {id=, name=, index=, state=, ports={ssh=, http=, https=}}
local function lab_hosts(d, name)
  local list, err = d:containers { all = true, labels = { M.LABEL .. "=" .. name } }
  if not list then return nil, err end
  local hosts = {}
  for _, c in ipairs(list) do
    local labels = c.Labels or {}
    local h = {
      id = c.Id, name = labels[M.LABEL_HOST] or (c.Names and c.Names[1] or ""):gsub("^/", ""),
      index = tonumber(labels[M.LABEL_INDEX]) or 0, state = c.State, image = c.Image, ports = {},
    }
    for _, p in ipairs(c.Ports or {}) do
      if p.PublicPort and (p.IP == "127.0.0.1" or p.IP == nil) then
        -- lua-cjson decodes every number as a float: 22.0
        local private = format("%d/%s", p.PrivatePort, p.Type or "tcp")
        for key, spec in pairs(M.PORTS) do
          if spec == private then h.ports[key] = math.tointeger(p.PublicPort) end
        end
      end
    end
    hosts[#hosts + 1] = h
  end
  table.sort(hosts, function(a, b) return a.index < b.index end)
  return hosts
end

--- Published ports of a container from inspect: {ssh=, http=, https=}, and the HostIp of each.
local function inspect_ports(d, id)
  local info, err = d:container_inspect(id)
  if not info then return nil, err end
  local ports, ips = {}, {}
  local bound = (info.NetworkSettings or {}).Ports or {}
  for key, spec in pairs(M.PORTS) do
    for _, b in ipairs(type(bound[spec]) == "table" and bound[spec] or {}) do
      if b.HostIp == "127.0.0.1" then ports[key] = tonumber(b.HostPort) end
      ips[#ips + 1] = b.HostIp
    end
  end
  if not ports.ssh then return nil, format("%s: no SSH port published on 127.0.0.1", info.Name or id) end
  return ports, ips, info
end

-- ---- lab image ---------------------------------------------------------------------

-- The lab host's PID 2 (docker-init is PID 1): sshd in the foreground.
local INIT_SCRIPT = [[
#!/bin/sh
# kengine lab host: there is no systemd here; sshd in the foreground is the
# container's main process (docker-init reaps orphans as PID 1).
set -e
mkdir -p /run/sshd
chmod 0755 /run/sshd
# kengine lab up copies a host key in before the first start; a container
# started any other way gets one of its own.
if [ ! -s /etc/ssh/ssh_host_ed25519_key ]; then
    ssh-keygen -q -t ed25519 -N '' -C "root@$(hostname)" -f /etc/ssh/ssh_host_ed25519_key
fi
exec /usr/sbin/sshd -D -e
]]

local SSHD_CONF = [[
# kengine lab host: key logins only, root allowed with a key.
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UseDNS no
MaxSessions 100
MaxStartups 100:30:200
]]

-- Run inside the tree (chroot) or the base container: leaves no host keys and
-- no apt caches behind, and lets PAM sessions work without CAP_AUDIT_CONTROL.
local FINISH_SCRIPT = [[
set -e
rm -f /etc/ssh/ssh_host_*
sed -i 's/^\(session\s\+\)required\(\s\+pam_loginuid\.so\)/\1optional\2/' /etc/pam.d/sshd
chmod 0755 /usr/local/sbin/kengine-lab-init
mkdir -p /root/.ssh
chmod 0700 /root /root/.ssh
# in a container /etc/hostname is a mount of Docker's (and not committed)
for f in /etc/hostname /etc/machine-id /var/lib/dbus/machine-id; do rm -f "$f" 2>/dev/null || true; done
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt/* /tmp/* /var/tmp/*
]]

local IMAGE_CHANGES = {
  'CMD ["/usr/local/sbin/kengine-lab-init"]',
  "EXPOSE 22/tcp 80/tcp 443/tcp",
  "ENV LANG=C.UTF-8",
  "LABEL io.kengine.lab.image=" .. M.SUITE,
}

local function sources_list(src)
  local lines = { "# written by kengine lab image from the build machine's apt sources" }
  lines[#lines + 1] = format("deb %s %s %s", src.mirror, M.SUITE, concat(src.components, " "))
  for _, e in ipairs(src.extra) do
    lines[#lines + 1] = format("deb %s %s %s", e.uri, e.suite, concat(e.components, " "))
  end
  return concat(lines, "\n") .. "\n"
end

--- Run debootstrap into dir, printing progress now and then; bounded by BUILD_TIMEOUT.
local function debootstrap(dir, mirror)
  local log = dir .. ".log"
  local argv = { "debootstrap", "--variant=minbase", "--include=" .. concat(M.PACKAGES, ","),
                 M.SUITE, dir, mirror }
  say("debootstrap: ", concat(argv, " "))
  local task = k.spawn(function()
    return k.exec({ "sh", "-c", 'exec "$@" >"$0" 2>&1', log, table.unpack(argv) },
      { timeout = M.BUILD_TIMEOUT })
  end)
  -- per-package lines ("I: Retrieving bash 5.2", "I: Unpacking bash...") are
  -- counted and summarised every 15s; phase lines are printed as they come
  local seen, count, last_print = 0, 0, k.now()
  local deadline = k.now() + M.BUILD_TIMEOUT + 10
  local function show()
    local text = k.read_file(log) or ""
    for line in text:sub(seen + 1):gmatch("([^\n]*)\n") do
      seen = seen + #line + 1
      line = line:gsub("%s+$", "")
      if line:match("^I: %a+ [%w][%w.+:~-]* %d%S*$") or line:match("^I: %a+ [%w][%w.+:~-]*%.%.%.$") then
        count = count + 1
        if k.now() - last_print >= 15 then
          say(format("  ... %d package steps (%s)", count, line:sub(4)))
          last_print = k.now()
        end
      elseif line:match("^[IEW]: ") then
        say("  ", #line > 110 and line:sub(1, 107) .. "..." or line)
        last_print = k.now()
      end
    end
  end
  while task:status() ~= "done" and task:status() ~= "failed" and k.now() < deadline do
    k.sleep(1)
    show()
  end
  local r, err = task:wait()
  show()
  if not r then return nil, "debootstrap: " .. tostring(err) end
  if r.code ~= 0 then
    local text = k.read_file(log) or ""
    return nil, format("debootstrap failed (exit %d); last lines of %s:\n%s", r.code, log,
      text:sub(-1500))
  end
  os.remove(log)
  return true
end

local function build_from_debootstrap(d, image, opts)
  local src, err = M.debian_sources(M.SUITE)
  if opts.mirror then
    src = src or { extra = {}, components = { "main" } }
    src.mirror = opts.mirror:gsub("/+$", "")
  elseif not src then
    return nil, err
  end
  for _, tool in ipairs({ "debootstrap", "tar" }) do
    if not run({ "sh", "-c", "command -v " .. tool }) then
      return nil, tool .. " is not installed (apt-get install " .. tool .. ")"
    end
  end
  local id = run({ "id", "-u" })
  if not id or trim(id.stdout) ~= "0" then return nil, "building the lab image needs root (debootstrap)" end

  local t0 = k.now()
  local mk, mkerr = run({ "mktemp", "-d", "/var/tmp/kengine-lab-image.XXXXXX" })
  if not mk then return nil, mkerr end
  local tmp = trim(mk.stdout)
  local root = tmp .. "/rootfs"
  local function cleanup() k.exec({ "rm", "-rf", tmp }) end
  local ok, derr = debootstrap(root, src.mirror)
  if not ok then cleanup() return nil, derr end
  say(format("debootstrap done in %.0fs", k.now() - t0))

  local fin, ferr = k.write_file(root .. "/usr/local/sbin/kengine-lab-init", INIT_SCRIPT, { mode = "0755" })
  if fin then fin, ferr = k.write_file(root .. "/etc/ssh/sshd_config.d/kengine-lab.conf", SSHD_CONF) end
  if fin then fin, ferr = k.write_file(root .. "/etc/apt/sources.list", sources_list(src)) end
  if fin then fin, ferr = run({ "chroot", root, "/bin/sh", "-c", FINISH_SCRIPT }) end
  if not fin then cleanup() return nil, "finishing the tree: " .. ferr end

  say("packing the tree")
  local tarball = tmp .. "/rootfs.tar.gz"
  local packed, perr = run({ "tar", "--numeric-owner", "-C", root, "-czf", tarball, "." }, { timeout = 900 })
  if not packed then cleanup() return nil, perr end
  -- kengine.http sends a request body from memory: the compressed tree (~100 MB) is read in once
  local data, rerr = k.read_file(tarball)
  if not data then cleanup() return nil, rerr end
  say(format("importing %.0f MB as %s", #data / 1e6, image))
  local repo, tag = image:match("^(.-):([^:/]+)$")
  local imported, ierr = d:image_import(data, { repo = repo or image, tag = tag or "latest",
    changes = IMAGE_CHANGES, message = "kengine lab image (debootstrap " .. M.SUITE .. ")" })
  data = nil -- luacheck: ignore 311
  collectgarbage()
  cleanup()
  if not imported then return nil, ierr end
  return true
end

local function build_from_image(d, image, base, opts)
  if not d:image_inspect(base) then
    say("pulling ", base)
    local ok, err = d:image_pull(base)
    if not ok then return nil, err end
  end
  local src = opts.mirror and { mirror = opts.mirror, components = { "main" }, extra = {} }
    or M.debian_sources(M.SUITE)
  local id, err = d:container_create({ Image = base, Cmd = { "sleep", "infinity" },
    Labels = { [M.LABEL .. ".build"] = image } })
  if not id then return nil, err end
  local function cleanup() d:container_remove(id, { force = true }) end
  local files = {
    { name = "usr/local/sbin/kengine-lab-init", content = INIT_SCRIPT, mode = "0755" },
    { name = "etc/ssh/sshd_config.d/kengine-lab.conf", content = SSHD_CONF },
  }
  if src then
    -- only a bookworm base gets this machine's bookworm mirror
    files[#files + 1] = { name = "tmp/kengine-lab-sources.list", content = sources_list(src) }
  end
  local ok, perr = d:put_archive(id, "/", docker.tar(files))
  if ok then ok, perr = d:container_start(id) end
  if not ok then cleanup() return nil, perr end
  local script = [[
set -e
if [ -f /tmp/kengine-lab-sources.list ] && grep -q '^VERSION_CODENAME=]] .. M.SUITE .. [[' /etc/os-release; then
    rm -f /etc/apt/sources.list.d/debian.sources
    mv /tmp/kengine-lab-sources.list /etc/apt/sources.list
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends ]] .. concat(M.PACKAGES, " ") .. "\n" .. FINISH_SCRIPT
  say("installing ", concat(M.PACKAGES, " "), " in a ", base, " container")
  local r, xerr = d:exec(id, { "sh", "-c", script }, { timeout = M.BUILD_TIMEOUT })
  if not r then cleanup() return nil, xerr end
  if r.code ~= 0 then
    cleanup()
    return nil, format("provisioning %s failed (exit %d):\n%s", base, r.code, (r.stdout .. r.stderr):sub(-1500))
  end
  d:container_stop(id, { t = 1 })
  local repo, tag = image:match("^(.-):([^:/]+)$")
  local committed, cerr = d:commit(id, { repo = repo or image, tag = tag or "latest", changes = IMAGE_CHANGES,
    comment = "kengine lab image from " .. base })
  cleanup()
  if not committed then return nil, cerr end
  return true
end

--- Build the lab image unless it exists (or opts.rebuild).
-- @param opts `image`, `from`, `rebuild`, `mirror`
-- @return true or nil, string
function M.image(opts)
  opts = opts or {}
  local d, err = client()
  if not d then return nil, err end
  local image = image_name(opts)
  local info = d:image_inspect(image)
  if info and not opts.rebuild then
    say(format("%s exists (%s, created %s); --rebuild builds it again", image,
      (info.Id or ""):sub(1, 19), info.Created or "?"))
    return true
  end
  local t0 = k.now()
  local ok, berr
  if opts.from then
    ok, berr = build_from_image(d, image, opts.from, opts)
  else
    ok, berr = build_from_debootstrap(d, image, opts)
  end
  if not ok then return nil, berr end
  say(format("built %s in %.0fs", image, k.now() - t0))
  return true
end

-- ---- lab up -------------------------------------------------------------------

local function keygen(path, comment)
  os.remove(path)
  os.remove(path .. ".pub")
  return run({ "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path })
end

local function create_spec(lab, host, index, image)
  local bindings, exposed = {}, {}
  for _, spec in pairs(M.PORTS) do
    exposed[spec] = {}
    bindings[spec] = { { HostIp = "127.0.0.1", HostPort = "" } }
  end
  return {
    Image = image,
    Hostname = host,
    Labels = { [M.LABEL] = lab, [M.LABEL_HOST] = host, [M.LABEL_INDEX] = tostring(index) },
    ExposedPorts = exposed,
    HostConfig = {
      Init = true,
      PortBindings = bindings,
      CapAdd = M.CAPS,
      SecurityOpt = M.SECURITY_OPT,
      Binds = M.BINDS,
      Tmpfs = M.TMPFS,
      RestartPolicy = { Name = "no" },
    },
  }
end

--- Create and start one host: its host key is made here and copied in before the first start.
local function create_host(d, lab, p, host, index, image, client_pub)
  local key = p.hostkeys .. "/" .. host
  local ok, err = keygen(key, "root@" .. host)
  if not ok then return nil, err end
  local priv, pub = k.read_file(key), k.read_file(key .. ".pub")
  os.remove(key) -- the private host key lives only in the container
  if not priv or not pub then return nil, "cannot read the generated host key " .. key end
  local id, cerr = d:container_create(create_spec(lab, host, index, image), { name = host })
  if not id then return nil, cerr end
  local archive = docker.tar {
    { name = "etc/ssh/ssh_host_ed25519_key", content = priv, mode = "0600" },
    { name = "etc/ssh/ssh_host_ed25519_key.pub", content = pub, mode = "0644" },
    { name = "root/.ssh", dir = true, mode = "0700" },
    { name = "root/.ssh/authorized_keys", content = client_pub, mode = "0600" },
  }
  ok, err = d:put_archive(id, "/", archive)
  if ok then ok, err = d:container_start(id) end
  if not ok then
    d:container_remove(id, { force = true })
    os.remove(key .. ".pub")
    return nil, err
  end
  return id
end

local function lua_string(s) return format("%q", s) end

--- The inventory file's text (kengine's Lua form).
function M.inventory_text(lab, p, hosts)
  local out = { "-- kengine lab '" .. lab .. "': written by `kengine lab up`; `kengine lab down` removes it.",
                "return {", "  hosts = {" }
  local names = {}
  for _, h in ipairs(hosts) do
    names[#names + 1] = lua_string(h.name)
    out[#out + 1] = format("    [%s] = { host = \"127.0.0.1\", port = %d, user = \"root\", "
      .. "vars = { lab_http_port = %d, lab_https_port = %d } },", lua_string(h.name), h.ports.ssh,
      h.ports.http or 0, h.ports.https or 0)
  end
  out[#out + 1] = "  },"
  out[#out + 1] = "  groups = {"
  out[#out + 1] = format("    lab = { hosts = { %s } },", concat(names, ", "))
  out[#out + 1] = format("    servers = { hosts = { %s } },", concat(names, ", "))
  out[#out + 1] = "  },"
  out[#out + 1] = format("  ssh = { identity = %s, known_hosts = %s, host_key = \"strict\" },",
    lua_string(p.identity), lua_string(p.known_hosts))
  out[#out + 1] = "}"
  return concat(out, "\n") .. "\n"
end

--- Wait until sshd on a host answers with the lab key and the recorded host key.
local function wait_ssh(p, h, deadline)
  local last
  repeat
    local s, err, code = k.ssh.connect { host = "127.0.0.1", port = h.ports.ssh, user = "root",
      identity = p.identity, known_hosts = p.known_hosts, host_key = "strict", config = false,
      agent = false, timeout = 5 }
    if s then
      local r = s:exec("true", { timeout = 10 })
      s:close()
      if r and r.code == 0 then return true end
    elseif code == "EHOSTKEY" then
      return nil, err -- never retried: the key is not the one we put there
    else
      last = err
    end
    k.sleep(0.3)
  until k.now() > deadline
  return nil, format("%s: sshd did not answer on 127.0.0.1:%d within %ds (%s)", h.name, h.ports.ssh,
    M.SSH_WAIT, tostring(last))
end

--- Start (or complete) a lab of n hosts.
-- @param opts `n`, `name`, `image`
-- @return {hosts=, inventory=} or nil, string
function M.up(opts)
  local lab, n = opts.name or M.DEFAULT_NAME, opts.n or 1
  local d, cerr = client()
  if not d then return nil, cerr end
  local image = image_name(opts)
  local _, ierr, icode = d:image_inspect(image)
  if icode == "ENOTFOUND" then
    return nil, format("image %s not found: run `kengine lab image` first", image)
  elseif ierr then
    return nil, ierr
  end
  local p = paths(lab)
  local made, merr = run({ "mkdir", "-p", p.hostkeys })
  if not made then return nil, merr end
  run({ "chmod", "0700", p.dir })
  if not exists(p.identity) or not exists(p.identity .. ".pub") then
    local kok, kerr = keygen(p.identity, "kengine-lab-" .. lab)
    if not kok then return nil, kerr end
  end
  local client_pub, perr = k.read_file(p.identity .. ".pub")
  if not client_pub then return nil, perr end

  local existing, lerr = lab_hosts(d, lab)
  if not existing then return nil, lerr end
  local by_name = {}
  for _, h in ipairs(existing) do
    by_name[h.name] = h
    if h.index < 1 or h.index > n then
      say("removing ", h.name)
      local rok, rerr = d:container_remove(h.id, { force = true })
      if not rok and not tostring(rerr):match("^ENOTFOUND") then return nil, rerr end
      os.remove(p.hostkeys .. "/" .. h.name .. ".pub")
    end
  end

  local t0 = k.now()
  local wanted = {}
  for i = 1, n do wanted[i] = format("%s-%d", lab, i) end
  local failed = each(wanted, function(host, i)
    local h, ok, err = by_name[host], true, nil
    if h and not exists(p.hostkeys .. "/" .. host .. ".pub") then
      -- its host key is not on record: nothing to check it against, so start afresh
      say(host, ": no recorded host key, re-creating")
      ok, err = d:container_remove(h.id, { force = true })
      h = nil
    end
    if ok and h then
      if h.state ~= "running" then ok, err = d:container_start(h.id) end
    elseif ok then
      ok, err = create_host(d, lab, p, host, i, image, client_pub)
    end
    if not ok then return host .. ": " .. tostring(err):gsub("^E%u+: ", "") end
  end)
  if failed then return nil, failed end

  -- ports are assigned at start: read them back, then record keys and inventory
  local hosts, kh = {}, {}
  for i, host in ipairs(wanted) do
    local ports, porterr = inspect_ports(d, host)
    if not ports then return nil, porterr end
    hosts[i] = { name = host, ports = ports }
    local pub = trim(k.read_file(p.hostkeys .. "/" .. host .. ".pub"))
    local ktype, kdata = pub:match("^(%S+)%s+(%S+)")
    kh[#kh + 1] = format("[127.0.0.1]:%d %s %s", ports.ssh, ktype, kdata)
  end
  local wok, werr = k.write_file(p.known_hosts, concat(kh, "\n") .. "\n", { mode = "0644" })
  if wok then wok, werr = k.write_file(p.inventory, M.inventory_text(lab, p, hosts), { mode = "0644" }) end
  if not wok then return nil, werr end

  local deadline = k.now() + M.SSH_WAIT
  local unreachable = each(hosts, function(h)
    local ok, err = wait_ssh(p, h, deadline)
    if not ok then return err end
  end)
  if unreachable then return nil, unreachable end
  return { hosts = hosts, inventory = p.inventory, known_hosts = p.known_hosts, identity = p.identity,
           seconds = k.now() - t0 }
end

-- ---- status, ssh, down, inventory ----------------------------------------------

local function print_hosts(hosts)
  say(format("%-20s %-10s %-8s %-8s %-8s", "HOST", "STATE", "SSH", "HTTP", "HTTPS"))
  for _, h in ipairs(hosts) do
    say(format("%-20s %-10s %-8s %-8s %-8s", h.name, h.state or "running", h.ports.ssh or "-",
      h.ports.http or "-", h.ports.https or "-"))
  end
end

local function cmd_status(opts)
  local d, err = client()
  if not d then return fail(err) end
  local hosts, lerr = lab_hosts(d, opts.name)
  if not hosts then return fail(lerr) end
  if #hosts == 0 then return fail(format("lab '%s' has no hosts (start it: kengine lab up --name %s)",
    opts.name, opts.name)) end
  print_hosts(hosts)
  local p = paths(opts.name)
  say("inventory: ", exists(p.inventory) and p.inventory or "(missing: run `kengine lab up` again)")
  for _, h in ipairs(hosts) do
    if h.state ~= "running" then return 1 end
  end
  return 0
end

local function shell_quote(s)
  if s:match("^[%w@%%+=:,./_-]+$") then return s end
  return "'" .. s:gsub("'", "'\\''") .. "'"
end

local function cmd_ssh(opts)
  local host = opts.args[1]
  if not host then return usage_error("ssh: missing HOST") end
  if host:match("^%d+$") then host = opts.name .. "-" .. host end
  local d, err = client()
  if not d then return fail(err) end
  local hosts, lerr = lab_hosts(d, opts.name)
  if not hosts then return fail(lerr) end
  local target
  for _, h in ipairs(hosts) do if h.name == host then target = h end end
  if not target then return fail(format("no host '%s' in lab '%s'", host, opts.name)) end
  if target.state ~= "running" or not target.ports.ssh then
    return fail(format("%s is %s (kengine lab up --name %s)", host, target.state, opts.name))
  end
  local p = paths(opts.name)
  local argv = { "ssh", "-i", p.identity, "-p", tostring(target.ports.ssh),
    "-o", "IdentitiesOnly=yes", "-o", "UserKnownHostsFile=" .. p.known_hosts,
    "-o", "GlobalKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=yes",
    "-o", "BatchMode=yes", "root@127.0.0.1" }
  if #opts.command > 0 then
    argv[#argv + 1] = "--"
    for _, a in ipairs(opts.command) do argv[#argv + 1] = a end
  end
  local quoted = {}
  for i, a in ipairs(argv) do quoted[i] = shell_quote(a) end
  io.stdout:flush()
  -- os.execute, not k.exec: ssh needs this terminal (stdin, stdout, stderr)
  local _, how, status = os.execute(concat(quoted, " "))
  if how == "signal" then return 128 + status end
  return status
end

--- Remove a lab's containers and files; safe when there is nothing to remove.
-- @return number of hosts removed, or nil, string
function M.down(name)
  local p = paths(name)
  local d, err = client()
  if not d then return nil, err end
  local hosts, lerr = lab_hosts(d, name)
  if not hosts then return nil, lerr end
  -- each task returns its error message, or nil
  local failed = each(hosts, function(h)
    local ok, rerr = d:container_remove(h.id, { force = true, volumes = true })
    if not ok and not tostring(rerr):match("^ENOTFOUND") then return h.name .. ": " .. rerr end
  end)
  if failed then return nil, failed end
  local ok, rerr = run({ "rm", "-rf", "--", p.dir })
  if not ok then return nil, rerr end
  return #hosts
end

-- ---- command line -----------------------------------------------------------------

local VALUE_OPTS = { name = true, image = true, from = true, mirror = true }
local FLAG_OPTS = { rebuild = true }

local function parse(args)
  local o = { args = {}, command = {} }
  local i = 1
  while i <= #args do
    local a = args[i]
    if a == "--" then
      for j = i + 1, #args do o.command[#o.command + 1] = args[j] end
      break
    end
    local opt, val = a:match("^%-%-([%w-]+)=(.*)$")
    opt = opt or a:match("^%-%-([%w-]+)$")
    if opt then
      if VALUE_OPTS[opt] then
        if val == nil then
          i = i + 1
          val = args[i]
          if val == nil then return nil, "option --" .. opt .. " needs a value" end
        end
        o[opt] = val
      elseif FLAG_OPTS[opt] and val == nil then
        o[opt] = true
      else
        return nil, "unknown option '" .. a .. "'"
      end
    else
      o.args[#o.args + 1] = a
    end
    i = i + 1
  end
  o.name = o.name or M.DEFAULT_NAME
  if not valid_name(o.name) then
    return nil, "bad lab name '" .. o.name .. "' (up to 40 lower-case letters, digits and '-')"
  end
  return o
end

local commands = {}

function commands.image(o)
  if #o.args > 0 then return usage_error("image: unexpected argument '" .. o.args[1] .. "'") end
  local ok, err = M.image(o)
  if not ok then return fail(err) end
  return 0
end

function commands.up(o)
  if #o.args > 1 then return usage_error("up: unexpected argument '" .. o.args[2] .. "'") end
  local n = tonumber(o.args[1] or "1")
  if not n or math.type(n) ~= "integer" or n < 1 or n > 50 then
    return usage_error("up: N must be a whole number from 1 to 50, got '" .. tostring(o.args[1]) .. "'")
  end
  o.n = n
  say(format("starting lab '%s': %d host%s", o.name, n, n == 1 and "" or "s"))
  local lab, err = M.up(o)
  if not lab then return fail(err) end
  print_hosts(lab.hosts)
  say(format("ready in %.1fs", lab.seconds))
  say("inventory:   ", lab.inventory)
  say("ssh:         kengine lab ssh ", lab.hosts[1].name, o.name ~= M.DEFAULT_NAME and " --name " .. o.name or "")
  say("run:         kengine run RECIPE -i ", lab.inventory)
  return 0
end

function commands.status(o)
  if #o.args > 0 then return usage_error("status: unexpected argument '" .. o.args[1] .. "'") end
  return cmd_status(o)
end

function commands.ssh(o)
  if #o.args > 1 then return usage_error("ssh: unexpected argument '" .. o.args[2] .. "' (use -- CMD)") end
  return cmd_ssh(o)
end

function commands.down(o)
  if #o.args > 0 then return usage_error("down: unexpected argument '" .. o.args[1] .. "'") end
  local n, err = M.down(o.name)
  if not n then return fail(err) end
  if n == 0 then
    say(format("lab '%s': no hosts to remove; files removed", o.name))
  else
    say(format("lab '%s': removed %d host%s and its files", o.name, n, n == 1 and "" or "s"))
  end
  return 0
end

function commands.inventory(o)
  if #o.args > 0 then return usage_error("inventory: unexpected argument '" .. o.args[1] .. "'") end
  local p = paths(o.name)
  if not exists(p.inventory) then
    return fail(format("lab '%s' has no inventory (start it: kengine lab up --name %s)", o.name, o.name))
  end
  say(p.inventory)
  return 0
end

--- `kengine lab ARGS…` → exit status
function M.cli(args)
  local sub = args[1]
  if sub == nil then io.stderr:write(M.HELP) return 2 end
  if sub == "help" or sub == "--help" or sub == "-h" then io.stdout:write(M.HELP) return 0 end
  local handler = commands[sub]
  if not handler then return usage_error("unknown command '" .. sub .. "'") end
  local o, err = parse({ table.unpack(args, 2) })
  if not o then return usage_error(sub .. ": " .. err) end
  if #o.command > 0 and sub ~= "ssh" then return usage_error(sub .. ": unexpected '--'") end
  return handler(o)
end

return M
