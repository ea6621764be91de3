--- kengine_bench.lua - kengine's side of bench/run.sh.
--
--   kengine run bench/kengine_bench.lua DIR [N [M [CMD]]]
--
-- DIR is a tests/support/sshd.sh directory (port, user, id_ed25519,
-- known_hosts).  N sessions connect at once (one task each, through
-- k.parallel), and each runs CMD (default `true`) M times, one after another,
-- over its one session.  With N = 1 this is the sequential measure: connect +
-- auth, then M execs over the open session.
--
-- Experiment: KENGINE_BENCH_GCPAUSE=P runs collectgarbage("incremental", P)
-- first (Lua's default pause is 200: a new cycle starts when the heap has
-- doubled).
--
-- Prints a summary and, last, one machine-readable line in the same format as
-- bench/floor.c:
--   RESULT tool=kengine n=N m=M wall_s=... connect_mean_ms=... connect_median_ms=...
--          exec_mean_ms=... exec_median_ms=... exec_first_ms=... exec_rest_mean_ms=...
--          commands=... errors=... vmhwm_kb=...
local k = require "kengine"

local MAX_N, MAX_M = 1000, 100000

local dir = arg[1]
local n = math.tointeger(tonumber(arg[2] or "1"))
local m = math.tointeger(tonumber(arg[3] or "1"))
local cmd = arg[4] or "true"
if not dir or not n or not m or n < 1 or n > MAX_N or m < 1 or m > MAX_M then
  io.stderr:write(("usage: kengine run bench/kengine_bench.lua DIR [N (1..%d) [M (1..%d) [CMD]]]\n")
    :format(MAX_N, MAX_M))
  os.exit(2)
end

local gcpause = math.tointeger(tonumber(os.getenv("KENGINE_BENCH_GCPAUSE") or ""))
if gcpause then collectgarbage("incremental", gcpause) end

local function first_line(name)
  local f = assert(io.open(dir .. "/" .. name))
  local s = f:read("l")
  f:close()
  return s
end

local opts = {
  host = "127.0.0.1", -- loopback only (DESIGN: network rule)
  port = math.tointeger(tonumber(first_line("port"))),
  user = first_line("user"),
  identity = dir .. "/id_ed25519",
  known_hosts = dir .. "/known_hosts",
  host_key = "strict",
  timeout = 30,
  config = false, -- no ~/.ssh/config: measure exactly what is asked
}

local function mean(v)
  local s = 0
  for _, x in ipairs(v) do s = s + x end
  return #v > 0 and s / #v or 0
end

local function median(v)
  if #v == 0 then return 0 end
  local c = table.move(v, 1, #v, 1, {})
  table.sort(c)
  local h = #c // 2
  return #c % 2 == 1 and c[h + 1] or (c[h] + c[h + 1]) / 2
end

-- peak resident set size of this process, from the kernel (kB)
local function vmhwm_kb()
  local f = io.open("/proc/self/status")
  if not f then return 0 end
  local s = f:read("a")
  f:close()
  return math.tointeger(tonumber(s:match("VmHWM:%s*(%d+)"))) or 0
end

-- one host: connect + auth, then M commands one after another
local function one(_, i)
  local r = { exec = {} }
  local t0 = k.now()
  local s, msg = k.ssh.connect(opts)
  if not s then
    r.err = ("session %d: connect: %s"):format(i, msg)
    return r
  end
  r.connect = (k.now() - t0) * 1000
  for j = 1, m do
    local t = k.now()
    local res, emsg = s:exec(cmd)
    if not res then
      r.err = ("session %d: exec %d: %s"):format(i, j, emsg)
      break
    elseif res.code ~= 0 then
      r.err = ("session %d: exec %d: '%s' exited with %d: %s"):format(i, j, cmd, res.code, res.stderr)
      break
    end
    r.exec[j] = (k.now() - t) * 1000
  end
  s:close()
  return r
end

local hosts = {}
for i = 1, n do hosts[i] = i end

local t0 = k.now()
local results, failures = k.parallel(hosts, one)
local wall = k.now() - t0
local hwm = vmhwm_kb()

local connects, execs, firsts, rest = {}, {}, {}, {}
local errors = 0
for i = 1, n do
  local r = results[i]
  local err = failures and failures[i] or (r and r.err)
  if err then
    errors = errors + 1
    if errors <= 5 then io.stderr:write("kengine_bench: ", tostring(err), "\n") end
  end
  if r then
    if r.connect then connects[#connects + 1] = r.connect end
    for j, x in ipairs(r.exec) do
      execs[#execs + 1] = x
      if j == 1 then firsts[#firsts + 1] = x else rest[#rest + 1] = x end
    end
  end
end

print(("kengine %s (libssh %s), %d session(s) x %d x '%s'"):format(k.version, k.ssh.libssh_version, n, m, cmd))
print(("  connect+auth ms: mean %.2f median %.2f (%d sessions)"):format(mean(connects), median(connects), #connects))
print(("  exec ms:         mean %.2f median %.2f (%d commands); first %.2f, rest mean %.2f")
  :format(mean(execs), median(execs), #execs, mean(firsts), mean(rest)))
print(("  wall s:          %.3f, errors %d, peak RSS %d kB"):format(wall, errors, hwm))
print(("RESULT tool=kengine n=%d m=%d wall_s=%.4f connect_mean_ms=%.3f connect_median_ms=%.3f "
  .. "exec_mean_ms=%.3f exec_median_ms=%.3f exec_first_ms=%.3f exec_rest_mean_ms=%.3f commands=%d errors=%d "
  .. "vmhwm_kb=%d")
  :format(n, m, wall, mean(connects), median(connects), mean(execs), median(execs), mean(firsts), mean(rest),
    #execs, errors, hwm))
os.exit(errors == 0 and 0 or 1)
