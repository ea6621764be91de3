-- package and apt_repository against real Debian lab hosts.  Every state is checked with a direct command
-- over a separate SSH session, never through the resource.  The repositories are local file:// trees built
-- here (a throwaway gpg key, a tiny .deb made with dpkg-deb, Packages/Release/InRelease written by hand)
-- and copied to the lab host: the only network the test needs is the lab's Debian mirror.
-- apt is slow: one host installs the packages (`tree`, `ed`: small, no new dependencies), the other the
-- repositories; each spends two or three `apt-get update`s.
local k = require "kengine"
local H = require "helpers"

local PKG_HOST, REPO_HOST
local S = {}        -- host -> direct session

local function sh(host, cmd, allow_fail)
  local r = assert(S[host]:exec(cmd))
  if not allow_fail then assert(r.code == 0, cmd .. ": " .. r.stderr .. r.stdout) end
  return r.stdout, r.code
end

local function recipe(host, body)
  return H.recipe(string.format('local k = require "kengine"\nreturn k.recipe { hosts = %q, run = function(h)\n%s\nend }\n',
    host, body))
end

local function run(host, path, ...)
  local code, out, err, events = H.lab_run(path, { ... })
  return { code = code, out = out .. err, steps = H.steps(events, host), recap = (H.recap(events) or {})[host] or {} }
end

local function installed(host, pkg)
  local out = sh(host, "dpkg-query -W -f='${Status}' " .. pkg .. " 2>/dev/null || true")
  return out == "install ok installed"
end

local function lexec(argv, opts)
  local r = assert(k.exec(argv, opts))
  assert(r.code == 0, table.concat(argv, " ") .. ": " .. r.stderr)
  return r.stdout
end

local function sha256(path) return (lexec({ "sha256sum", path }):match("^(%x+)")) end
local function size(path) return #assert(k.read_file(path)) end

-- the local repository material: two throwaway keys, one .deb
local work, gnupg, other_gnupg, key_asc, key_gpg, deb

local function gpg(home, args, opts)
  local argv = { "gpg", "--homedir", home, "--batch", "--quiet", "--pinentry-mode", "loopback", "--passphrase", "" }
  for _, a in ipairs(args) do argv[#argv + 1] = a end
  return lexec(argv, opts)
end

local function new_key(home, uid)
  lexec({ "mkdir", "-m", "0700", "-p", home })
  gpg(home, { "--quick-gen-key", uid, "ed25519", "sign", "never" })
end

local function build_deb()
  local root = work .. "/pkgroot"
  lexec({ "mkdir", "-p", root .. "/DEBIAN", root .. "/usr/share/kengine-lab-hello" })
  assert(k.write_file(root .. "/usr/share/kengine-lab-hello/hello.txt", "hello from a kengine test repository\n"))
  assert(k.write_file(root .. "/DEBIAN/control", table.concat({
    "Package: kengine-lab-hello", "Version: 1.0", "Architecture: all", "Maintainer: kengine tests <t@kengine.invalid>",
    "Installed-Size: 1", "Description: kengine lab test package", "" }, "\n")))
  deb = work .. "/kengine-lab-hello_1.0_all.deb"
  lexec({ "dpkg-deb", "--root-owner-group", "-Zgzip", "--build", root, deb })
end

-- a repository tree dir/dists/stable/... signed with the key in home; packages: list of .deb paths
-- (listed in Packages, copied to pool/) or extra stanzas as strings
local function build_repo(dir, home, packages)
  local bin = dir .. "/dists/stable/main/binary-amd64"
  lexec({ "mkdir", "-p", bin, dir .. "/pool" })
  local stanzas = {}
  for _, p in ipairs(packages) do
    if p:match("%.deb$") then
      local name = p:match("([^/]+)$")
      lexec({ "cp", p, dir .. "/pool/" .. name })
      stanzas[#stanzas + 1] = table.concat({ "Package: kengine-lab-hello", "Version: 1.0", "Architecture: all",
        "Maintainer: kengine tests <t@kengine.invalid>", "Installed-Size: 1", "Filename: pool/" .. name,
        "Size: " .. size(p), "SHA256: " .. sha256(p), "Description: kengine lab test package", "" }, "\n")
    else
      stanzas[#stanzas + 1] = p
    end
  end
  assert(k.write_file(bin .. "/Packages", table.concat(stanzas, "\n")))
  local release = table.concat({
    "Origin: kengine-test", "Label: kengine-test", "Suite: stable", "Codename: stable",
    "Date: " .. os.date("!%a, %d %b %Y %H:%M:%S UTC"), "Architectures: amd64", "Components: main", "SHA256:",
    string.format(" %s %d main/binary-amd64/Packages", sha256(bin .. "/Packages"), size(bin .. "/Packages")), "" },
    "\n")
  assert(k.write_file(dir .. "/dists/stable/Release", release))
  gpg(home, { "--yes", "--clearsign", "-o", dir .. "/dists/stable/InRelease", dir .. "/dists/stable/Release" })
end

-- copy a local directory to the lab host
local function push(host, dir, remote)
  local tar = work .. "/push.tar"
  lexec({ "tar", "-C", dir, "-cf", tar, "." })
  assert(S[host]:upload(tar, "/tmp/kg-push.tar"))
  sh(host, "rm -rf " .. remote .. " && mkdir -p " .. remote .. " && tar -C " .. remote ..
    " -xf /tmp/kg-push.tar && rm -f /tmp/kg-push.tar && chmod -R a+rX " .. remote)
end

-- apt-get update with just this source file: exit 0 and not a single warning (a bad signature is only a W:)
local function update_only(host, file)
  local out, code = sh(host, "apt-get update -o Dir::Etc::sourcelist=" .. file ..
    " -o Dir::Etc::sourceparts=- -o APT::Get::List-Cleanup=0 2>&1", true)
  return code == 0 and not out:find("\n[WE]:") and not out:find("^[WE]:"), out
end

describe("package and apt_repository on lab hosts", function()
  setup(function()
    local lab = H.lab()
    PKG_HOST, REPO_HOST = lab.name .. "-1", lab.name .. "-2"
    S[PKG_HOST], S[REPO_HOST] = H.lab_connect(PKG_HOST), H.lab_connect(REPO_HOST)
    -- a fresh state whatever an earlier run left
    -- (the lab image has no apt lists: an empty cache is the fresh state)
    sh(PKG_HOST, "dpkg --purge tree ed >/dev/null 2>&1; rm -rf /var/lib/kengine; rm -f /var/lib/apt/lists/*_*")
    sh(REPO_HOST, "dpkg --purge kengine-lab-hello >/dev/null 2>&1; rm -rf /var/lib/kengine /srv/kgrepo-* " ..
      "/etc/apt/sources.list.d/kgtest* /etc/apt/keyrings/kgtest*; rm -f /var/lib/apt/lists/*_*")

    work = H.tmpdir("apt")
    gnupg, other_gnupg = work .. "/gnupg", work .. "/gnupg-other"
    new_key(gnupg, "kengine test repository <repo@kengine.invalid>")
    new_key(other_gnupg, "someone else <other@kengine.invalid>")
    key_asc = gpg(gnupg, { "--armor", "--export" })
    key_gpg = gpg(gnupg, { "--export" })
    assert(key_asc:find("BEGIN PGP PUBLIC KEY BLOCK", 1, true) and #key_gpg > 100)
    build_deb()
    local trees = work .. "/trees"
    -- only -c has the package (the others prove key + source + apt-get update with an empty Packages)
    for _, name in ipairs({ "a", "b", "d" }) do build_repo(trees .. "/kgrepo-" .. name, gnupg, {}) end
    build_repo(trees .. "/kgrepo-c", gnupg, { deb })
    -- signed with a key apt is not told about
    build_repo(trees .. "/kgrepo-e", other_gnupg, { table.concat({ "Package: kengine-lab-unverified",
      "Version: 1.0", "Architecture: all", "Filename: pool/none.deb", "Size: 1", "Description: x", "" }, "\n") })
    assert(k.write_file(trees .. "/kgrepo-b/key.asc", key_asc))
    push(REPO_HOST, trees, "/srv")
  end)

  teardown(function()
    for _, home in ipairs({ gnupg, other_gnupg }) do
      if home then k.exec({ "gpgconf", "--homedir", home, "--kill", "all" }) end
    end
    if S[PKG_HOST] then
      sh(PKG_HOST, "dpkg --purge tree ed >/dev/null 2>&1", true)
      S[PKG_HOST]:close()
    end
    if S[REPO_HOST] then
      sh(REPO_HOST, "dpkg --purge kengine-lab-hello >/dev/null 2>&1; rm -rf /srv/kgrepo-* " ..
        "/etc/apt/sources.list.d/kgtest* /etc/apt/keyrings/kgtest*", true)
      S[REPO_HOST]:close()
    end
  end)

  describe("package", function()
    it("installs several packages in one step, updating the empty cache first; --check and a re-run change nothing",
      function()
      local path = recipe(PKG_HOST, [[
        h:package { name = { "tree", "ed" }, update_cache = true, cache_valid_time = 3600 }
      ]])
      local c = run(PKG_HOST, path, "--check", "--diff")
      assert.equal(0, c.code, c.out)
      assert.equal(1, c.recap.changed, c.out)
      assert.equal("changed", c.steps[1].status)
      assert.is_true(c.steps[1].check)
      assert.matches("install tree, ed", c.steps[1].msg, 1, true)
      assert.matches("-tree: not installed", c.steps[1].diff, 1, true)
      assert.is_false(installed(PKG_HOST, "tree"))
      assert.is_false(installed(PKG_HOST, "ed"))
      assert.equal("no\n", sh(PKG_HOST, "test -e /var/lib/kengine/apt-update-stamp && echo yes || echo no"))

      local r = run(PKG_HOST, path)
      assert.equal(0, r.code, r.out)
      assert.equal(1, r.recap.changed, r.out)
      assert.equal("install tree, ed", r.steps[1].msg)
      assert.is_true(installed(PKG_HOST, "tree"))
      assert.is_true(installed(PKG_HOST, "ed"))
      local stamp = sh(PKG_HOST, "stat -c %Y /var/lib/kengine/apt-update-stamp")

      -- converged, and the cache is fresh enough: no second update
      local again = run(PKG_HOST, path)
      assert.equal(0, again.code, again.out)
      assert.equal(0, again.recap.changed, again.out)
      assert.equal("ok", again.steps[1].status)
      assert.equal(stamp, sh(PKG_HOST, "stat -c %Y /var/lib/kengine/apt-update-stamp"))
      local chk = run(PKG_HOST, path, "--check")
      assert.equal(0, chk.recap.changed, chk.out)
    end)

    it("updates the cache when asked, and that alone is not a change; latest on the newest version is ok", function()
      if not installed(PKG_HOST, "tree") then sh(PKG_HOST, "apt-get update -q >/dev/null && apt-get install -y -q tree") end
      sh(PKG_HOST, "mkdir -p /var/lib/kengine && touch -d '2 days ago' /var/lib/kengine/apt-update-stamp")
      local path = recipe(PKG_HOST, [[
        h:package { name = "tree", update_cache = true }
        h:package { name = "tree", state = "latest" }
      ]])
      local r = run(PKG_HOST, path)
      assert.equal(0, r.code, r.out)
      assert.equal(0, r.recap.changed, r.out)
      assert.equal("ok", r.steps[1].status)
      assert.equal("apt cache updated", r.steps[1].msg)
      assert.equal("ok", r.steps[2].status)
      local age = tonumber((sh(PKG_HOST, "echo $(( $(date +%s) - $(stat -c %Y /var/lib/kengine/apt-update-stamp) ))")))
      assert.is_true(age < 600, "the stamp was not renewed: " .. age)
    end)

    it("removes a package, waiting for the dpkg lock another process holds", function()
      if not installed(PKG_HOST, "ed") then sh(PKG_HOST, "apt-get install -y -q ed >/dev/null 2>&1") end
      local path = recipe(PKG_HOST, [[ h:package { name = "ed", state = "absent" } ]])
      local c = run(PKG_HOST, path, "--check")
      assert.equal(1, c.recap.changed, c.out)
      assert.equal("remove ed", c.steps[1].msg)
      assert.is_true(installed(PKG_HOST, "ed"))
      -- apt takes the frontend lock with fcntl: hold it for 3 s
      sh(PKG_HOST, "python3 -c 'import fcntl, time; f = open(\"/var/lib/dpkg/lock-frontend\", \"w\"); " ..
        "fcntl.lockf(f, fcntl.LOCK_EX); open(\"/tmp/kg-locked\", \"w\").close(); time.sleep(3)' " ..
        ">/dev/null 2>&1 </dev/null & for i in $(seq 50); do [ -e /tmp/kg-locked ] && break; sleep 0.1; done; " ..
        "rm -f /tmp/kg-locked")
      local t0 = k.now()
      local r = run(PKG_HOST, path)
      assert.equal(0, r.code, r.out)
      assert.equal(1, r.recap.changed, r.out)
      assert.is_true(k.now() - t0 > 1.5, "apt did not wait for the lock")
      assert.is_false(installed(PKG_HOST, "ed"))
      local again = run(PKG_HOST, path)
      assert.equal(0, again.recap.changed, again.out)
    end)

    it("fails on an unknown package, naming it, in check mode too", function()
      local path = recipe(PKG_HOST, [[ h:package { name = { "tree", "kengine-no-such-package" } } ]])
      for _, args in ipairs({ { "--check" }, {} }) do
        local r = run(PKG_HOST, path, table.unpack(args))
        assert.equal(1, r.code, r.out)
        assert.equal("failed", r.steps[1].status)
        assert.matches("unknown package: kengine-no-such-package", r.steps[1].msg, 1, true)
        assert.equal(1, r.recap.failed)
      end
      assert.is_false(installed(PKG_HOST, "kengine-no-such-package"))
    end)

    it("rejects a malformed name before connecting", function()
      local path = recipe(PKG_HOST, [[ h:package { name = "tree; rm -rf /" } ]])
      local r = run(PKG_HOST, path)
      assert.equal(1, r.code, r.out)
      assert.matches("invalid package name 'tree; rm -rf /'", r.out, 1, true)
    end)
  end)

  describe("apt_repository", function()
    it("adds a deb822 source with its armored key; apt-get update verifies it; --check and a re-run change nothing",
      function()
      local path = recipe(REPO_HOST, string.format([[
        h:apt_repository { name = "kgtest-a", uri = "file:///srv/kgrepo-a", suite = "stable", components = { "main" },
                           arch = "amd64", key = %q }
      ]], key_asc))
      local c = run(REPO_HOST, path, "--check", "--diff")
      assert.equal(0, c.code, c.out)
      assert.equal(1, c.recap.changed, c.out)
      assert.matches("+Signed-By: /etc/apt/keyrings/kgtest-a.asc", c.steps[1].diff, 1, true)
      assert.equal("absent\n", sh(REPO_HOST, "ls /etc/apt/sources.list.d/kgtest-a.sources /etc/apt/keyrings/kgtest-a.asc " ..
        "/var/lib/kengine/apt-update-needed >/dev/null 2>&1 && echo present || echo absent"))

      local r = run(REPO_HOST, path, "--diff")
      assert.equal(0, r.code, r.out)
      assert.equal(1, r.recap.changed, r.out)
      assert.equal(table.concat({ "# managed by kengine (apt_repository kgtest-a)", "Types: deb",
        "URIs: file:///srv/kgrepo-a", "Suites: stable", "Components: main", "Architectures: amd64",
        "Signed-By: /etc/apt/keyrings/kgtest-a.asc", "" }, "\n"), sh(REPO_HOST, "cat /etc/apt/sources.list.d/kgtest-a.sources"))
      assert.equal(key_asc, sh(REPO_HOST, "cat /etc/apt/keyrings/kgtest-a.asc"))
      assert.equal("644 root\n", sh(REPO_HOST, "stat -c '%a %U' /etc/apt/keyrings/kgtest-a.asc"))
      -- the next package step will update the lists
      sh(REPO_HOST, "test -e /var/lib/kengine/apt-update-needed")
      local ok, out = update_only(REPO_HOST, "/etc/apt/sources.list.d/kgtest-a.sources")
      assert.is_true(ok, out)

      local again = run(REPO_HOST, path)
      assert.equal(0, again.code, again.out)
      assert.equal(0, again.recap.changed, again.out)
    end)

    it("fetches key_url on the target and dearmors it into a .gpg keyring, one-line format", function()
      local path = recipe(REPO_HOST, [[
        h:apt_repository { name = "kgtest-b", uri = "file:///srv/kgrepo-b", suite = "stable", format = "list",
                           key_url = "file:///srv/kgrepo-b/key.asc", keyring = "/etc/apt/keyrings/kgtest-b.gpg" }
      ]])
      local c = run(REPO_HOST, path, "--check")
      assert.equal(1, c.recap.changed, c.out)
      assert.equal("", sh(REPO_HOST, "ls /etc/apt/keyrings/ | grep kgtest-b || true"))
      local r = run(REPO_HOST, path)
      assert.equal(0, r.code, r.out)
      assert.equal(1, r.recap.changed, r.out)
      assert.equal("# managed by kengine (apt_repository kgtest-b)\n" ..
        "deb [signed-by=/etc/apt/keyrings/kgtest-b.gpg] file:///srv/kgrepo-b stable main\n",
        sh(REPO_HOST, "cat /etc/apt/sources.list.d/kgtest-b.list"))
      -- byte for byte what `gpg --export` (= gpg --dearmor of the armored key) gives
      assert.equal(key_gpg, sh(REPO_HOST, "cat /etc/apt/keyrings/kgtest-b.gpg"))
      local ok, out = update_only(REPO_HOST, "/etc/apt/sources.list.d/kgtest-b.list")
      assert.is_true(ok, out)
      assert.equal(0, run(REPO_HOST, path).recap.changed)

      -- switching the format replaces the .list by a .sources file
      local p2 = recipe(REPO_HOST, [[
        h:apt_repository { name = "kgtest-b", uri = "file:///srv/kgrepo-b", suite = "stable",
                           key_url = "file:///srv/kgrepo-b/key.asc", keyring = "/etc/apt/keyrings/kgtest-b.gpg" }
      ]])
      local s = run(REPO_HOST, p2)
      assert.equal(1, s.recap.changed, s.out)
      assert.matches("remove kgtest-b.list", s.steps[1].msg, 1, true)
      assert.equal("sources\n", sh(REPO_HOST, "cd /etc/apt/sources.list.d && ls kgtest-b.* | sed 's/.*\\.//'"))
    end)

    it("installs a package from a repository added in the same run (the changed source updates the cache)",
      function()
      local path = recipe(REPO_HOST, string.format([[
        h:apt_repository { name = "kgtest-c", uri = "file:///srv/kgrepo-c", suite = "stable", key = %q }
        h:package { name = "kengine-lab-hello" }
      ]], key_asc))
      local c = run(REPO_HOST, path, "--check")
      assert.equal(0, c.code, c.out)
      assert.equal(2, c.recap.changed, c.out)
      assert.matches("install kengine-lab-hello (apt cache not updated in check mode)", c.steps[2].msg, 1, true)
      assert.is_false(installed(REPO_HOST, "kengine-lab-hello"))

      local r = run(REPO_HOST, path)
      assert.equal(0, r.code, r.out)
      assert.equal(2, r.recap.changed, r.out)
      assert.is_true(installed(REPO_HOST, "kengine-lab-hello"))
      assert.equal("hello from a kengine test repository\n", sh(REPO_HOST, "cat /usr/share/kengine-lab-hello/hello.txt"))
      assert.equal("no\n", sh(REPO_HOST, "test -e /var/lib/kengine/apt-update-needed && echo yes || echo no"))

      local again = run(REPO_HOST, path)
      assert.equal(0, again.recap.changed, again.out)
    end)

    it("a repository signed by another key: the cache update fails and says why", function()
      local path = recipe(REPO_HOST, string.format([[
        h:apt_repository { name = "kgtest-e", uri = "file:///srv/kgrepo-e", suite = "stable", key = %q }
        h:package { name = "kengine-lab-unverified" }
      ]], key_asc))
      local r = run(REPO_HOST, path)
      assert.equal(1, r.code, r.out)
      assert.equal("changed", r.steps[1].status)
      assert.equal("failed", r.steps[2].status)
      assert.matches("apt-get update failed", r.steps[2].msg, 1, true)
      assert.matches("NO_PUBKEY", r.steps[2].msg, 1, true)
      assert.matches("file:/srv/kgrepo-e stable InRelease' is not signed", r.steps[2].msg, 1, true)
      assert.is_false(installed(REPO_HOST, "kengine-lab-unverified"))
      sh(REPO_HOST, "rm -f /etc/apt/sources.list.d/kgtest-e.sources")
    end)

    it("converts keys between armored and binary exactly as gpg does (no gpg needed on the target)", function()
      local res = require("kengine.resources").apt_repository
      assert.equal(key_gpg, res.dearmor(key_asc))
      assert.equal(key_asc, res.armor(key_gpg))
      -- a binary key for the default .asc keyring is stored armored
      local path = recipe(REPO_HOST, string.format([[
        h:apt_repository { name = "kgtest-f", uri = "file:///srv/kgrepo-f", suite = "stable", key = %q,
                           state = "present" }
      ]], key_gpg))
      local r = run(REPO_HOST, path)
      assert.equal(0, r.code, r.out)
      assert.equal(key_asc, sh(REPO_HOST, "cat /etc/apt/keyrings/kgtest-f.asc"))
      sh(REPO_HOST, "rm -f /etc/apt/sources.list.d/kgtest-f.sources /etc/apt/keyrings/kgtest-f.asc")
    end)

    it("state = absent removes the source and its keyring", function()
      sh(REPO_HOST, "mkdir -p /etc/apt/keyrings && echo x > /etc/apt/keyrings/kgtest-d.asc && " ..
        "echo 'Types: deb' > /etc/apt/sources.list.d/kgtest-d.sources && rm -f /var/lib/kengine/apt-update-needed")
      local path = recipe(REPO_HOST, [[ h:apt_repository { name = "kgtest-d", state = "absent" } ]])
      local c = run(REPO_HOST, path, "--check")
      assert.equal(1, c.recap.changed, c.out)
      sh(REPO_HOST, "test -e /etc/apt/sources.list.d/kgtest-d.sources")
      local r = run(REPO_HOST, path)
      assert.equal(1, r.recap.changed, r.out)
      assert.equal("", sh(REPO_HOST, "ls /etc/apt/sources.list.d/ /etc/apt/keyrings/ | grep kgtest-d || true"))
      sh(REPO_HOST, "test -e /var/lib/kengine/apt-update-needed")
      assert.equal(0, run(REPO_HOST, path).recap.changed)
    end)
  end)
end)
