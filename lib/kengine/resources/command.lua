--- command and shell: run a program on the target, as a step (thin wrappers over h:exec).
-- h:command{ argv = { "useradd", "-m", name } }        -- each word quoted, no shell
-- h:command{ cmd = "tar -xzf /tmp/app.tgz -C /opt" }    -- split into words like sh would, but no shell:
--                                                       -- $VAR, |, >, * … reach the program literally
-- h:shell{ cmd = "curl -fsS localhost/health | grep ok" }  -- the login shell runs it as written
-- Both take chdir = "/dir", env = { NAME = "value" or secret }, and the step options of h:exec: creates,
-- removes, changed_when, failed_when, check_safe, stdin, timeout, name, notify, tags, sudo, ignore_errors,
-- retries/delay/until.  They are not run in check mode unless check_safe = true (a read-only command).
-- They return h:exec's result: {code, stdout, stderr, changed, skipped, failed, msg}.
local hostmod = require "kengine.host"
local secret = require "kengine.secret"

local Host, quote, STEP_OPTS = hostmod.Host, hostmod.quote, hostmod.STEP_OPTS

local M = {}

--- Split a command line into words the way sh does, without any expansion:
-- blanks separate words; '…' is literal; in "…" a backslash escapes \ " $ ` and newline; elsewhere a
-- backslash escapes the next character.  @return words or nil, msg
function M.split(s)
  local words, cur, i, n = {}, nil, 1, #s
  local function add(c) cur = (cur or "") .. c end
  while i <= n do
    local c = s:sub(i, i)
    if c == " " or c == "\t" or c == "\n" then
      if cur then words[#words + 1] = cur; cur = nil end
    elseif c == "'" then
      local j = s:find("'", i + 1, true)
      if not j then return nil, "unterminated ' quote" end
      add(s:sub(i + 1, j - 1))
      i = j
    elseif c == '"' then
      local buf = {}
      i = i + 1
      while true do
        if i > n then return nil, 'unterminated " quote' end
        local d = s:sub(i, i)
        if d == '"' then break end
        if d == "\\" and i < n and ('\\"$`\n'):find(s:sub(i + 1, i + 1), 1, true) then
          i = i + 1
          d = s:sub(i, i)
        end
        buf[#buf + 1] = d
        i = i + 1
      end
      add(table.concat(buf))
    elseif c == "\\" then
      if i == n then return nil, "trailing backslash" end
      i = i + 1
      add(s:sub(i, i))
    else
      add(c)
    end
    i = i + 1
  end
  if cur then words[#words + 1] = cur end
  return words
end

-- split params into our own, h:exec's step options, and an error for anything else
local function split_params(kind, params, own)
  if type(params) ~= "table" then error(kind .. ": table of parameters expected, got " .. type(params), 3) end
  local p, opts = {}, {}
  for key, v in pairs(params) do
    if own[key] then
      p[key] = v
    elseif STEP_OPTS[key] then
      opts[key] = v
    else
      error(kind .. ": unknown parameter '" .. tostring(key) .. "'", 3)
    end
  end
  return p, opts
end

-- "cd DIR && NAME=value; export NAME; " prefix (shell), or "env NAME=value " (command)
-- and the same with secret values shown as ***
local function prelude(kind, p, has_secret)
  local parts, shown = {}, {}
  if p.chdir ~= nil then
    if type(p.chdir) ~= "string" or p.chdir == "" then error(kind .. ": chdir must be a directory path", 3) end
    parts[#parts + 1] = "cd -- " .. quote(p.chdir) .. " || exit 1; "
    shown[#shown + 1] = parts[#parts]
  end
  if p.env ~= nil then
    if type(p.env) ~= "table" then error(kind .. ": env must be a table of NAME = value", 3) end
    local names = {}
    for name in pairs(p.env) do
      if type(name) ~= "string" or not name:match("^[%a_][%w_]*$") then
        error(kind .. ": env: invalid variable name '" .. tostring(name) .. "'", 3)
      end
      names[#names + 1] = name
    end
    table.sort(names)
    for _, name in ipairs(names) do
      local v = p.env[name]
      if secret.is(v) then has_secret = true end
      if type(v) ~= "string" and type(v) ~= "number" and not secret.is(v) then
        error(kind .. ": env: value of " .. name .. " must be a string", 3)
      end
      parts[#parts + 1] = name .. "=" .. quote(secret.reveal(v)) .. "; export " .. name .. "; "
      shown[#shown + 1] = name .. "=" .. (secret.is(v) and "***" or quote(v)) .. "; export " .. name .. "; "
    end
  end
  return table.concat(parts), has_secret, table.concat(shown)
end

-- a command that holds a secret travels as a secret (h:exec keeps it off the command line); the step
-- is then named after the command with only the secret parts hidden, not all of it
--
-- timeout = N runs the command under timeout(1) on the target: when it takes longer it is killed and the
-- step fails with exit status 124, like any failed command.  (h:exec's own timeout gives up on the
-- channel instead, which the runtime counts as a lost connection.)  The channel still has a backstop.
local function finish(text, has_secret, shown, opts, shell)
  local renamed = has_secret
  if opts.timeout ~= nil then
    if type(opts.timeout) ~= "number" or opts.timeout <= 0 then error("timeout must be a positive number", 3) end
    text = "timeout -k 5 " .. string.format("%d", math.ceil(opts.timeout)) .. " " .. shell .. " -c " .. quote(text)
    opts.timeout = math.ceil(opts.timeout) + 60
    renamed = true
  end
  if renamed and opts.name == nil then
    opts.name = "exec " .. (#shown > 60 and (shown:sub(1, 57) .. "...") or shown)
  end
  if has_secret then return secret.new(text) end
  return text
end

local COMMAND_PARAMS = { argv = true, cmd = true, chdir = true, env = true }

--- Run a program with arguments, no shell.
-- @return h:exec's result
function Host:command(params)
  local p, opts = split_params("command", params, COMMAND_PARAMS)
  if (p.argv == nil) == (p.cmd == nil) then error("command: give argv (a list) or cmd (a string)", 2) end
  local argv, has_secret = p.argv, false
  if p.cmd ~= nil then
    if type(p.cmd) ~= "string" then error("command: cmd must be a string (use argv for secrets)", 2) end
    local err
    argv, err = M.split(p.cmd)
    if not argv then error("command: cmd: " .. err, 2) end
  elseif type(argv) ~= "table" then
    error("command: argv must be a list of strings", 2)
  end
  if #argv == 0 then error("command: no program given", 2) end
  local words, shown_words = {}, {}
  for i, a in ipairs(argv) do
    if secret.is(a) then has_secret = true
    elseif type(a) ~= "string" and type(a) ~= "number" then
      error("command: argv[" .. i .. "] must be a string, got " .. type(a), 2)
    end
    words[i] = quote(secret.reveal(a))
    shown_words[i] = secret.is(a) and "***" or words[i]
  end
  local pre, shown
  pre, has_secret, shown = prelude("command", p, has_secret)
  return self:exec(finish(pre .. table.concat(words, " "), has_secret,
    shown .. table.concat(shown_words, " "), opts, "sh"), opts)
end

local SHELL_PARAMS = { cmd = true, chdir = true, env = true, executable = true }

--- Run a shell command line (pipes, redirections, variables).  executable = "/bin/bash" runs it with that
-- shell instead of the login shell.
-- @return h:exec's result
function Host:shell(params)
  local p, opts = split_params("shell", params, SHELL_PARAMS)
  if type(p.cmd) ~= "string" and not secret.is(p.cmd) then error("shell: cmd (a string) is required", 2) end
  local pre, has_secret, shown = prelude("shell", p, secret.is(p.cmd))
  local cmd = secret.reveal(p.cmd)
  local shown_cmd = secret.is(p.cmd) and "***" or cmd
  if p.executable ~= nil then
    if type(p.executable) ~= "string" or p.executable:sub(1, 1) ~= "/" then
      error("shell: executable must be an absolute path", 2)
    end
    cmd = quote(p.executable) .. " -c " .. quote(cmd)
    shown_cmd = quote(p.executable) .. " -c " .. (secret.is(p.cmd) and "***" or quote(shown_cmd))
  end
  return self:exec(finish(pre .. cmd, has_secret, shown .. shown_cmd, opts, "\"${SHELL:-/bin/sh}\""), opts)
end

M.command, M.shell = Host.command, Host.shell
return M
