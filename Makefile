# kengine — build, test, install.  Dependencies are Debian packages: `make deps`.
VERSION  := 0.1.0
PREFIX   ?= /usr/local
CC       ?= cc
PKGS     := lua5.4 libssh libcurl
CFLAGS   ?= -O2 -g
CFLAGS   += -std=gnu11 -Wall -Wextra -Werror -DKENGINE_VERSION='"$(VERSION)"' \
            $(shell pkg-config --cflags $(PKGS)) -I/usr/include/lua5.4
LDLIBS   += -l:liblua5.4-cjson.a $(shell pkg-config --libs $(PKGS)) -ledit -lm
SRCS     := engine/main.c engine/loop.c engine/readline.c \
            bindings/ssh.c bindings/http.c bindings/proc.c
HDRS     := engine/loop.h
SANITIZE := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined

DEB_BUILD := gcc make pkg-config liblua5.4-dev libssh-dev libcurl4-openssl-dev \
             lua-cjson-dev libedit-dev
DEB_RUN   := lua5.4 lua-cjson lua-yaml lua-busted lua-check luarocks \
             openssh-server openssh-client openssl python3 procps iproute2 ca-certificates \
             ansible-core docker.io debootstrap python3-yaml busybox-static

.PHONY: all deps deps-check demo test asan-test lab-ready lint rock-test install uninstall clean

all: kengine

kengine: $(SRCS) $(HDRS)
	$(CC) $(CFLAGS) -o $@ $(SRCS) $(LDFLAGS) $(LDLIBS)

kengine-asan: $(SRCS) $(HDRS)
	$(CC) $(CFLAGS) -O1 $(SANITIZE) -o $@ $(SRCS) $(LDFLAGS) $(LDLIBS)

# install the Debian packages only when one is missing (make demo / make test on a fresh machine)
deps-check:
	@dpkg-query -W $(DEB_BUILD) $(DEB_RUN) >/dev/null 2>&1 || $(MAKE) deps

deps:
	apt-get update
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(DEB_BUILD) $(DEB_RUN)

# The main job on the lab: a lab host set up end to end by recipes/full.lua.
# make demo ARGS="-e replicas=5" scales the demo service.
demo: deps-check kengine
	scripts/demo.sh $(ARGS)

# Every test: unit and integration specs against loopback sshd and HTTPS
# servers the harness starts, lint, and the LuaRocks build.
test: deps-check kengine lint lab-ready
	tests/run.sh ./kengine
	python3 -m unittest tests/sim/test_sim.py
	tests/rock.sh

asan-test: kengine-asan lab-ready
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
	  tests/run.sh ./kengine-asan

# Docker running (no systemd here) and the lab image built (once, ~3 min)
lab-ready: kengine
	tests/support/dockerd.sh
	./kengine lab image

lint:
	luacheck -q lib tests bench recipes

install: kengine
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/share/kengine/lua
	install -m 0755 kengine $(DESTDIR)$(PREFIX)/bin/kengine
	cd lib && find . -name '*.lua' -exec install -D -m 0644 {} $(DESTDIR)$(PREFIX)/share/kengine/lua/{} \;

uninstall:
	rm -f $(DESTDIR)$(PREFIX)/bin/kengine
	rm -rf $(DESTDIR)$(PREFIX)/share/kengine

clean:
	rm -f kengine kengine-asan
	rm -rf .rocks-test
