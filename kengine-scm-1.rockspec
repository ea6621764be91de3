rockspec_format = "3.0"
package = "kengine"
version = "scm-1"
source = {
  url = "git+file:///work/main",
}
description = {
  summary = "Lua-scriptable server automation: fast non-blocking SSH, HTTP and JSON primitives",
  detailed = [[
kengine runs automation recipes written in Lua over one SSH connection per
host, many hosts at once from one process.  This rock installs the bindings
(kengine.core, kengine.ssh, kengine.http, kengine.proc, kengine.readline) as
Lua C modules and the Lua library, so `require "kengine"` works from a stock
lua5.4.  The `kengine` binary is built with `make`.]],
  license = "MIT",
}
dependencies = {
  "lua >= 5.4",
  "lua-cjson",
  "lyaml",
}
external_dependencies = {
  LIBSSH = { header = "libssh/libssh.h" },
  CURL = { header = "curl/curl.h" },
  LIBEDIT = { header = "editline/readline.h" },
}
local defines = { 'KENGINE_VERSION="0.1.0"' }
build = {
  type = "builtin",
  modules = {
    -- each C module carries the loop; they share one loop state in the registry
    ["kengine.core"] = {
      sources = { "engine/loop.c" }, defines = defines,
      libraries = { "curl" }, incdirs = { "$(CURL_INCDIR)" }, libdirs = { "$(CURL_LIBDIR)" },
    },
    ["kengine.ssh"] = {
      sources = { "bindings/ssh.c", "engine/loop.c" }, defines = defines,
      libraries = { "ssh", "curl" },
      incdirs = { "$(LIBSSH_INCDIR)", "$(CURL_INCDIR)" }, libdirs = { "$(LIBSSH_LIBDIR)", "$(CURL_LIBDIR)" },
    },
    ["kengine.http"] = {
      sources = { "bindings/http.c", "engine/loop.c" }, defines = defines,
      libraries = { "curl" }, incdirs = { "$(CURL_INCDIR)" }, libdirs = { "$(CURL_LIBDIR)" },
    },
    ["kengine.proc"] = {
      sources = { "bindings/proc.c", "engine/loop.c" }, defines = defines,
      libraries = { "curl" }, incdirs = { "$(CURL_INCDIR)" }, libdirs = { "$(CURL_LIBDIR)" },
    },
    ["kengine.readline"] = {
      sources = { "engine/readline.c" },
      libraries = { "edit" }, incdirs = { "$(LIBEDIT_INCDIR)" }, libdirs = { "$(LIBEDIT_LIBDIR)" },
    },
    -- Lua modules (tests/rock.sh checks that every file under lib/ is listed)
    ["kengine.base64"] = "lib/kengine/base64.lua",
    ["kengine.cli"] = "lib/kengine/cli.lua",
    ["kengine.diff"] = "lib/kengine/diff.lua",
    ["kengine.docker"] = "lib/kengine/docker.lua",
    ["kengine.host"] = "lib/kengine/host.lua",
    ["kengine"] = "lib/kengine/init.lua",
    ["kengine.inventory"] = "lib/kengine/inventory.lua",
    ["kengine.json"] = "lib/kengine/json.lua",
    ["kengine.k8s"] = "lib/kengine/k8s.lua",
    ["kengine.lab"] = "lib/kengine/lab.lua",
    ["kengine.mission"] = "lib/kengine/mission.lua",
    ["kengine.pretty"] = "lib/kengine/pretty.lua",
    ["kengine.rancher"] = "lib/kengine/rancher.lua",
    ["kengine.recipe"] = "lib/kengine/recipe.lua",
    ["kengine.repl"] = "lib/kengine/repl.lua",
    ["kengine.report"] = "lib/kengine/report.lua",
    ["kengine.resources.apt_repository"] = "lib/kengine/resources/apt_repository.lua",
    ["kengine.resources.command"] = "lib/kengine/resources/command.lua",
    ["kengine.resources.docker"] = "lib/kengine/resources/docker.lua",
    ["kengine.resources.download"] = "lib/kengine/resources/download.lua",
    ["kengine.resources.file"] = "lib/kengine/resources/file.lua",
    ["kengine.resources"] = "lib/kengine/resources/init.lua",
    ["kengine.resources.k8s"] = "lib/kengine/resources/k8s.lua",
    ["kengine.resources.line"] = "lib/kengine/resources/line.lua",
    ["kengine.resources.nginx"] = "lib/kengine/resources/nginx.lua",
    ["kengine.resources.package"] = "lib/kengine/resources/package.lua",
    ["kengine.resources.rancher"] = "lib/kengine/resources/rancher.lua",
    ["kengine.resources.service"] = "lib/kengine/resources/service.lua",
    ["kengine.resources.sshd"] = "lib/kengine/resources/sshd.lua",
    ["kengine.resources.template"] = "lib/kengine/resources/template.lua",
    ["kengine.resources.user"] = "lib/kengine/resources/user.lua",
    ["kengine.resources.wait_for"] = "lib/kengine/resources/wait_for.lua",
    ["kengine.runner"] = "lib/kengine/runner.lua",
    ["kengine.secret"] = "lib/kengine/secret.lua",
    ["kengine.template"] = "lib/kengine/template.lua",
  },
}
test = {
  type = "command",
  command = "make test",
}
