-- Concurrency as behaviour, not timing: 50 operations at once, each recording
-- when it started and ended; every one must start before the first one ends.
local k = require "kengine"
local H = require "helpers"

local N = 50

local function assert_overlap(starts, ends)
  assert.equal(N, #starts)
  assert.equal(N, #ends)
  local first_end = math.huge
  for _, e in ipairs(ends) do first_end = math.min(first_end, e) end
  for i, s in ipairs(starts) do
    assert(s < first_end, string.format("operation %d started at %.3f, after the first end %.3f", i, s, first_end))
  end
end

local function read_times(dir, suffix)
  local out = {}
  for i = 1, N do out[i] = tonumber(assert(k.read_file(dir .. "/" .. i .. suffix))) end
  return out
end

describe("concurrency", function()
  it("runs 50 remote commands at once over 50 sessions", function()
    local dir = "/tmp/kg-conc-" .. math.random(1e9)
    local boot = H.connect()
    assert.equal(0, boot:exec("mkdir -p " .. dir).code)
    local res = k.parallel((function() local t = {} for i = 1, N do t[i] = i end return t end)(),
      function(i)
        local s <close> = H.connect()
        return assert(s:exec(string.format(
          "date +%%s.%%N > %s/%d.start; sleep 1; date +%%s.%%N > %s/%d.end; echo %d", dir, i, dir, i, i))).stdout
      end)
    for i = 1, N do assert.equal(i .. "\n", res[i]) end
    local starts, ends = {}, {}
    for i = 1, N do
      starts[i] = tonumber(boot:get(dir .. "/" .. i .. ".start"))
      ends[i] = tonumber(boot:get(dir .. "/" .. i .. ".end"))
    end
    assert_overlap(starts, ends)
    boot:exec("rm -rf " .. dir)
    boot:close()
  end)

  it("runs 50 channels at once on one session", function()
    local s = H.connect({ max_channels = N })
    local dir = "/tmp/kg-chan-" .. math.random(1e9)
    assert.equal(0, s:exec("mkdir -p " .. dir).code)
    local list = {}
    for i = 1, N do list[i] = i end
    k.parallel(list, function(i)
      return assert(s:exec(string.format(
        "date +%%s.%%N > %s/%d.start; sleep 1; date +%%s.%%N > %s/%d.end", dir, i, dir, i)))
    end)
    local starts, ends = {}, {}
    for i = 1, N do
      starts[i] = tonumber(s:get(dir .. "/" .. i .. ".start"))
      ends[i] = tonumber(s:get(dir .. "/" .. i .. ".end"))
    end
    assert_overlap(starts, ends)
    s:exec("rm -rf " .. dir)
    s:close()
  end)

  it("runs 50 HTTP requests at once", function()
    local srv = H.https()
    local list = {}
    for i = 1, N do list[i] = "conc" .. i end
    local res = k.parallel(list, function(id)
      return assert(k.http.get(srv.base .. "/slow?ms=1000&id=" .. id, { cacert = srv.cacert })).body
    end)
    for i = 1, N do assert.equal("conc" .. i, res[i]) end
    local starts, ends = {}, {}
    for i = 1, N do
      starts[i] = tonumber(assert(k.read_file(srv.dir .. "/slow/conc" .. i .. ".start")))
      ends[i] = tonumber(assert(k.read_file(srv.dir .. "/slow/conc" .. i .. ".end")))
    end
    assert_overlap(starts, ends)
  end)

  it("runs 50 local commands at once", function()
    local dir = H.tmpdir("local-conc")
    local list = {}
    for i = 1, N do list[i] = i end
    k.parallel(list, function(i)
      return assert(k.exec(string.format(
        "date +%%s.%%N > %s/%d.start; sleep 1; date +%%s.%%N > %s/%d.end", dir, i, dir, i)))
    end)
    assert_overlap(read_times(dir, ".start"), read_times(dir, ".end"))
  end)

  it("interleaves sleeping tasks", function()
    local order = {}
    local a = k.spawn(function() k.sleep(0.2); order[#order + 1] = "a" end)
    local b = k.spawn(function() k.sleep(0.1); order[#order + 1] = "b" end)
    a:wait(); b:wait()
    assert.same({ "b", "a" }, order)
  end)
end)
