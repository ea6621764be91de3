-- file (content, source, backup, directory, link, absent, parents), line, block
-- and template against a real Debian lab host.  Every state is checked with a
-- direct command over a separate SSH session, never through the resource.
local k = require "kengine"
local H = require "helpers"

local HOST, S





local kit = H.lab_kit(function() return HOST, S end)
local sh, recipe, run, converge = kit.sh, kit.recipe, kit.run, kit.converge
describe("file, line, block, template on a lab host", function()
  setup(function()
    local lab = H.lab()
    HOST = lab.name .. "-1"
    S = H.lab_connect(HOST)
    sh("rm -rf /tmp/kgf")
  end)

  teardown(function()
    if S then sh("rm -rf /tmp/kgf", true); S:close() end
  end)

  it("file: content, mode, owner — check, create, converge, diff", function()
    local path = recipe [[
      h:file { path = "/tmp/kgf/content/motd", content = "hello\nworld\n", mode = "0640", owner = "nobody",
               group = "nogroup", parents = true }
    ]]
    local c, r = converge(path, 1, function()
      assert.equal("absent\n", sh("test -e /tmp/kgf/content/motd && echo present || echo absent"))
    end)
    assert.matches("+hello", c.out, 1, true)
    assert.matches("+world", r.out, 1, true)
    assert.equal("hello\nworld\n", sh("cat /tmp/kgf/content/motd"))
    assert.equal("640 nobody nogroup\n", sh("stat -c '%a %U %G' /tmp/kgf/content/motd"))
    -- a changed mode only is a change of mode, not of content
    sh("chmod 0600 /tmp/kgf/content/motd")
    local m = run(path)
    assert.equal(1, m.recap.changed)
    assert.matches("mode 600 → 640", m.steps[1].msg, 1, true)
    assert.equal("640\n", sh("stat -c %a /tmp/kgf/content/motd"))
  end)

  it("file: content from a local source file, with a backup of the old content", function()
    local src = H.tmpdir("src") .. "/app.conf"
    assert(k.write_file(src, "port = 8080\nworkers = 4\n"))
    sh("mkdir -p /tmp/kgf/source && printf 'port = 80\\n' > /tmp/kgf/source/app.conf")
    local path = recipe(string.format([[
      local r = h:file { path = "/tmp/kgf/source/app.conf", source = %q, backup = true }
      if r.backup then h:file { path = "/tmp/kgf/source/backup-name", content = r.backup } end
    ]], src))
    local c = run(path, "--check", "--diff")
    assert.equal(1, c.recap.changed, c.out)
    assert.matches("-port = 80", c.out, 1, true)
    assert.matches("+workers = 4", c.out, 1, true)
    assert.equal("port = 80\n", sh("cat /tmp/kgf/source/app.conf"))
    assert.equal("", sh("ls /tmp/kgf/source/ | grep '~$' || true"))

    local r = run(path)
    assert.equal(0, r.code, r.out)
    assert.equal(2, r.recap.changed, r.out)
    assert.equal("port = 8080\nworkers = 4\n", sh("cat /tmp/kgf/source/app.conf"))
    local backup = sh("cat /tmp/kgf/source/backup-name")
    assert.matches("^/tmp/kgf/source/app%.conf%.%d%d%d%d%-%d%d%-%d%d@%d%d:%d%d:%d%d~$", backup)
    assert.matches("(backup " .. backup .. ")", r.steps[1].msg, 1, true)
    assert.equal("port = 80\n", sh("cat " .. backup))

    local again = run(path)
    assert.equal(0, again.recap.changed, again.out)
    assert.equal("1\n", sh("ls /tmp/kgf/source/ | grep -c '~$'"))

    local missing = run(recipe [[ h:file { path = "/tmp/kgf/source/x", source = "/nonexistent/kgf-src" } ]])
    assert.equal(1, missing.code)
    assert.matches("cannot read source /nonexistent/kgf-src", missing.out, 1, true)
  end)

  it("file: directory with parents, mode and owner, recursively", function()
    local nop = run(recipe [[ h:file { path = "/tmp/kgf/dir/a/b", state = "directory" } ]])
    assert.equal(1, nop.code)
    assert.matches("parent directory /tmp/kgf/dir/a does not exist (parents = true to create it)", nop.out, 1, true)
    assert.equal(1, select(2, sh("test -e /tmp/kgf/dir/a", true)))

    local path = recipe [[
      h:file { path = "/tmp/kgf/dir/a/b", state = "directory", parents = true, mode = "0750", owner = "nobody" }
    ]]
    converge(path, 1, function()
      assert.equal(1, select(2, sh("test -e /tmp/kgf/dir", true)))
    end)
    assert.equal("750 nobody directory\n", sh("stat -c '%a %U %F' /tmp/kgf/dir/a/b"))

    sh("mkdir -p /tmp/kgf/dir/tree/x/y && touch /tmp/kgf/dir/tree/x/y/f /tmp/kgf/dir/tree/g")
    local rec = recipe [[
      h:file { path = "/tmp/kgf/dir/tree", state = "directory", owner = "nobody", group = "nogroup", recursive = true }
    ]]
    converge(rec, 1, function()
      assert.equal("root\n", sh("stat -c %U /tmp/kgf/dir/tree/x/y/f"))
    end)
    assert.equal("", sh("find /tmp/kgf/dir/tree \\( ! -user nobody -o ! -group nogroup \\) -print"))
    -- one file below changing owner is a change again
    sh("chown root /tmp/kgf/dir/tree/x/y/f")
    local r = run(rec)
    assert.equal(1, r.recap.changed)
    assert.equal("nobody\n", sh("stat -c %U /tmp/kgf/dir/tree/x/y/f"))
  end)

  it("file: symlink, retargeted, and a file replaced only with force", function()
    sh("mkdir -p /tmp/kgf/link && echo one > /tmp/kgf/link/one && echo two > /tmp/kgf/link/two")
    local path = recipe [[ h:file { path = "/tmp/kgf/link/current", state = "link", src = "/tmp/kgf/link/one" } ]]
    converge(path, 1, function()
      assert.equal(1, select(2, sh("test -L /tmp/kgf/link/current", true)))
    end)
    assert.equal("/tmp/kgf/link/one\n", sh("readlink /tmp/kgf/link/current"))

    local re = run(recipe [[ h:file { path = "/tmp/kgf/link/current", state = "link", src = "two" } ]])
    assert.equal(1, re.recap.changed, re.out)
    assert.matches("link /tmp/kgf/link/one → two", re.steps[1].msg, 1, true)
    assert.equal("two\n", sh("cat /tmp/kgf/link/current"))

    sh("echo data > /tmp/kgf/link/plain")
    local refused = run(recipe [[ h:file { path = "/tmp/kgf/link/plain", state = "link", src = "one" } ]])
    assert.equal(1, refused.code)
    assert.matches("/tmp/kgf/link/plain is a regular file (force = true to replace it with a link)", refused.out, 1,
      true)
    assert.equal("data\n", sh("cat /tmp/kgf/link/plain"))
    local forced = run(recipe [[ h:file { path = "/tmp/kgf/link/plain", state = "link", src = "one", force = true } ]])
    assert.equal(0, forced.code, forced.out)
    assert.equal("one\n", sh("readlink /tmp/kgf/link/plain"))
  end)

  it("file: absent removes files, links and empty directories; a full directory only with force", function()
    sh("mkdir -p /tmp/kgf/absent/empty /tmp/kgf/absent/full/sub && echo x > /tmp/kgf/absent/f && " ..
      "ln -s f /tmp/kgf/absent/l && echo y > /tmp/kgf/absent/full/sub/y")
    local path = recipe [[
      for _, p in ipairs({ "/tmp/kgf/absent/f", "/tmp/kgf/absent/l", "/tmp/kgf/absent/empty", "/tmp/kgf/absent/none" }) do
        h:file { path = p, state = "absent" }
      end
    ]]
    converge(path, 3, function()
      assert.equal("empty\nf\nfull\nl\n", sh("ls /tmp/kgf/absent"))
    end)
    assert.equal("full\n", sh("ls /tmp/kgf/absent"))

    local refused = run(recipe [[ h:file { path = "/tmp/kgf/absent/full", state = "absent" } ]])
    assert.equal(1, refused.code)
    assert.matches("/tmp/kgf/absent/full is a non-empty directory (force = true to remove it with everything in it)",
      refused.out, 1, true)
    assert.equal("y\n", sh("cat /tmp/kgf/absent/full/sub/y"))
    converge(recipe [[ h:file { path = "/tmp/kgf/absent/full", state = "absent", force = true } ]], 1)
    assert.equal("", sh("ls /tmp/kgf/absent"))
  end)

  it("line: replace by pattern, insert after, remove", function()
    sh("mkdir -p /tmp/kgf/line && printf 'a=1\\n# port\\nPort 22\\nz=9\\n' > /tmp/kgf/line/conf")
    local path = recipe [[
      h:line { path = "/tmp/kgf/line/conf", regexp = "^Port ", line = "Port 2222" }
      h:line { path = "/tmp/kgf/line/conf", line = "b=2", insert_after = "^a=" }
      h:line { path = "/tmp/kgf/line/conf", regexp = "^z=", state = "absent" }
    ]]
    local c = converge(path, 3, function()
      assert.equal("a=1\n# port\nPort 22\nz=9\n", sh("cat /tmp/kgf/line/conf"))
    end)
    assert.matches("-Port 22", c.out, 1, true)
    assert.matches("+Port 2222", c.out, 1, true)
    assert.equal("a=1\nb=2\n# port\nPort 2222\n", sh("cat /tmp/kgf/line/conf"))

    local missing = run(recipe [[ h:line { path = "/tmp/kgf/line/nofile", line = "x" } ]])
    assert.equal(1, missing.code)
    assert.matches("/tmp/kgf/line/nofile does not exist (create = true to create it)", missing.out, 1, true)
  end)

  it("block: a managed block inserted, then updated and removed in place", function()
    sh("mkdir -p /tmp/kgf/block && printf 'first\\nlast\\n' > /tmp/kgf/block/hosts")
    local path = recipe [[
      h:block { path = "/tmp/kgf/block/hosts", block = "10.0.0.1 db\n10.0.0.2 cache\n", insert_before = "^last" }
    ]]
    converge(path, 1, function()
      assert.equal("first\nlast\n", sh("cat /tmp/kgf/block/hosts"))
    end)
    assert.equal("first\n# BEGIN MANAGED BY KENGINE\n10.0.0.1 db\n10.0.0.2 cache\n# END MANAGED BY KENGINE\nlast\n",
      sh("cat /tmp/kgf/block/hosts"))
    local upd = run(recipe [[ h:block { path = "/tmp/kgf/block/hosts", block = "10.0.0.3 db\n" } ]], "--diff")
    assert.equal(1, upd.recap.changed, upd.out)
    assert.matches("-10.0.0.2 cache", upd.out, 1, true)
    assert.equal("first\n# BEGIN MANAGED BY KENGINE\n10.0.0.3 db\n# END MANAGED BY KENGINE\nlast\n",
      sh("cat /tmp/kgf/block/hosts"))
    converge(recipe [[ h:block { path = "/tmp/kgf/block/hosts", state = "absent" } ]], 1)
    assert.equal("first\nlast\n", sh("cat /tmp/kgf/block/hosts"))
  end)

  it("template: text and local file, rendered with vars, converged like a file", function()
    local src = H.tmpdir("tpl") .. "/site.conf.tpl"
    assert(k.write_file(src, "server {\n{% for _, p in ipairs(ports) do %}  listen {{ p }};\n{% end %}" ..
      "  server_name {{ name }};\n}\n"))
    local path = recipe(string.format([[
      h:file { path = "/tmp/kgf/tpl", state = "directory" }
      h:template { path = "/tmp/kgf/tpl/site.conf", src = %q, vars = { ports = { 80, 8080 }, name = h.name },
                   mode = "0600" }
      h:template { path = "/tmp/kgf/tpl/inline", template = "host={{ host }}\n", vars = { host = "kgf" } }
    ]], src))
    local c = converge(path, 3, function()
      assert.equal(1, select(2, sh("test -e /tmp/kgf/tpl", true)))
    end)
    assert.matches("+  listen 8080;", c.out, 1, true)
    assert.equal("server {\n  listen 80;\n  listen 8080;\n  server_name " .. HOST .. ";\n}\n",
      sh("cat /tmp/kgf/tpl/site.conf"))
    assert.equal("600\n", sh("stat -c %a /tmp/kgf/tpl/site.conf"))
    assert.equal("host=kgf\n", sh("cat /tmp/kgf/tpl/inline"))
  end)

  it("template: an error names the template and the line", function()
    local src = H.tmpdir("tplerr") .. "/broken.tpl"
    assert(k.write_file(src, "line one\nline two\nvalue={{ missing_var }}\n"))
    local r = run(recipe(string.format([[ h:template { path = "/tmp/kgf/tpl-broken", src = %q, vars = {} } ]], src)))
    assert.equal(1, r.code)
    assert.matches(src .. ":3: undefined variable 'missing_var'", r.out, 1, true)
    assert.equal(1, select(2, sh("test -e /tmp/kgf/tpl-broken", true)))

    local syntax = run(recipe [[
      h:template { path = "/tmp/kgf/tpl-broken", template = "a\nb\n{% if x then %}\nc\n", vars = { x = 1 } }
    ]])
    assert.equal(1, syntax.code)
    assert.matches("template:%d+: .*'end' expected", syntax.out)
    local unclosed = run(recipe [[
      h:template { path = "/tmp/kgf/tpl-broken", template = "a\n\n{{ x\n", vars = { x = 1 } }
    ]])
    assert.equal(1, unclosed.code)
    assert.matches("template:3: unclosed '{{'", unclosed.out, 1, true)
    assert.equal(1, select(2, sh("test -e /tmp/kgf/tpl-broken", true)))
  end)
end)
