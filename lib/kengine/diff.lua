--- Unified diffs of two texts, for --diff output.
-- @module kengine.diff
local M = {}

local function lines(s)
  local t = {}
  if s == nil or s == "" then return t end
  for line in (s:sub(-1) == "\n" and s or s .. "\n"):gmatch("(.-)\n") do t[#t + 1] = line end
  return t
end

local MAX_CELLS = 4e6 -- LCS table bound: beyond it, a summary instead of a diff

--- Unified diff of old and new text (nil counts as empty).
-- @return the diff as a string ("" when equal)
function M.unified(old, new, from_name, to_name, context)
  context = context or 3
  if old == new then return "" end
  local a, b = lines(old), lines(new)
  local n, m = #a, #b
  local out = { "--- " .. (from_name or "before"), "+++ " .. (to_name or "after") }
  if (n + 1) * (m + 1) > MAX_CELLS then
    out[#out + 1] = string.format("@@ files differ: %d lines before, %d lines after (too large to diff) @@", n, m)
    return table.concat(out, "\n") .. "\n"
  end
  -- LCS lengths from the end, so the walk below goes forward
  local L = {}
  for i = n + 1, 1, -1 do
    L[i] = {}
    for j = m + 1, 1, -1 do
      if i > n or j > m then L[i][j] = 0
      elseif a[i] == b[j] then L[i][j] = L[i + 1][j + 1] + 1
      else
        local x, y = L[i + 1][j], L[i][j + 1]
        L[i][j] = x >= y and x or y
      end
    end
  end
  local ops, i, j = {}, 1, 1 -- { kind, text, old_line, new_line }
  while i <= n or j <= m do
    if i <= n and j <= m and a[i] == b[j] then
      ops[#ops + 1] = { " ", a[i], i, j }; i = i + 1; j = j + 1
    elseif i <= n and (j > m or L[i + 1][j] >= L[i][j + 1]) then
      ops[#ops + 1] = { "-", a[i], i, j }; i = i + 1 -- deletions first, as diff -u prints them
    else
      ops[#ops + 1] = { "+", b[j], i, j }; j = j + 1
    end
  end
  -- group changes into hunks with context
  local k = 1
  while k <= #ops do
    while k <= #ops and ops[k][1] == " " do k = k + 1 end
    if k > #ops then break end
    local s = math.max(1, k - context)
    local e = k
    while true do
      while e <= #ops and ops[e][1] ~= " " do e = e + 1 end
      local nxt = e
      while nxt <= #ops and ops[nxt][1] == " " do nxt = nxt + 1 end
      if nxt <= #ops and nxt - e <= 2 * context then e = nxt else break end
    end
    local stop = math.min(#ops, e - 1 + context)
    local ostart, nstart, ocount, ncount = ops[s][3], ops[s][4], 0, 0
    local body = {}
    for x = s, stop do
      local op = ops[x]
      body[#body + 1] = op[1] .. op[2]
      if op[1] ~= "+" then ocount = ocount + 1 end
      if op[1] ~= "-" then ncount = ncount + 1 end
    end
    out[#out + 1] = string.format("@@ -%d,%d +%d,%d @@", ocount == 0 and ostart - 1 or ostart, ocount,
      ncount == 0 and nstart - 1 or nstart, ncount)
    for _, line in ipairs(body) do out[#out + 1] = line end
    k = stop + 1
  end
  return table.concat(out, "\n") .. "\n"
end

return M
