--- base: the first recipe for a fresh Ubuntu/Debian server.
-- Admin users with authorized keys and passwordless sudo, SSH hardening that
-- never locks out the connecting user, base packages, timezone, and
-- (optionally) unattended upgrades.
--
-- vars:
--   admin_users         list of { name =, keys = { "ssh-ed25519 …" }, shell = "/bin/bash" }   ({})
--   base_packages       packages to install                              (see below)
--   timezone            e.g. "Europe/Berlin"                             ("UTC")
--   ssh_hardening       apply the sshd drop-in                           (true)
--   ssh_settings        extra/override sshd settings                     ({})
--   unattended_upgrades install and enable unattended-upgrades           (false)
local k = require "kengine"

return k.recipe {
  name = "base",
  hosts = "servers",
  sudo = true,
  vars = {
    admin_users = {},
    base_packages = { "sudo", "curl", "ca-certificates", "tzdata", "openssl", "less", "procps" },
    timezone = "UTC",
    ssh_hardening = true,
    ssh_settings = {},
    unattended_upgrades = false,
  },
  run = function(h)
    local v = h.vars
    h:package { name = v.base_packages, update_cache = true, cache_valid_time = 3600 }

    for _, u in ipairs(v.admin_users) do
      h:user { name = u.name, shell = u.shell or "/bin/bash", groups = { "sudo" }, append = true,
        authorized_keys = u.keys or {} }
      h:file { path = "/etc/sudoers.d/90-kengine-" .. u.name, mode = "0440",
        content = u.name .. " ALL=(ALL) NOPASSWD:ALL\n" }
    end

    h:file { path = "/etc/timezone", content = v.timezone .. "\n" }
    h:file { path = "/etc/localtime", state = "link", src = "/usr/share/zoneinfo/" .. v.timezone }

    if v.ssh_hardening then
      local settings = {
        PasswordAuthentication = "no",
        KbdInteractiveAuthentication = "no",
        PermitRootLogin = "prohibit-password",
        X11Forwarding = "no",
        MaxAuthTries = "4",
      }
      for key, value in pairs(v.ssh_settings) do settings[key] = value end
      h:sshd { settings = settings }
    end

    if v.unattended_upgrades then
      h:package { name = "unattended-upgrades" }
      h:file { path = "/etc/apt/apt.conf.d/20auto-upgrades", mode = "0644",
        content = 'APT::Periodic::Update-Package-Lists "1";\nAPT::Periodic::Unattended-Upgrade "1";\n' }
    end
  end,
}
