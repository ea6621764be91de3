-- Run busted inside kengine, so specs exercise the real binary and its loop:
-- `kengine run tests/busted.lua [busted args]` (tests/run.sh does this).
require "busted.runner" ({ standalone = false })
