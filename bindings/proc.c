/*
 * proc.c - kengine.proc: local processes and files.
 *
 * exec() starts a child with posix_spawn and non-blocking pipes, and waits on
 * them and on a pidfd through the engine loop, so local commands run
 * concurrently with SSH and HTTP work.  write_file() is atomic: a temporary
 * file in the same directory, fsync, rename.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../engine/loop.h"

#define PROC_MT "kengine.proc.exec"
#define CHUNK 65536

extern char **environ;

typedef struct {
  char *p;
  size_t n, cap;
} pbuf;

typedef struct {
  kg_op op;
  kg_loop *loop;
  pid_t pid;
  int pidfd;
  int in, out, err;   /* our ends of the pipes, -1 when closed */
  char *stdin_data;
  size_t inlen, inoff;
  pbuf obuf, ebuf;
  double deadline, timeout;
  int status, exited;
  char *what;         /* command for messages */
} proc_op;

static int pbuf_add(pbuf *b, const char *d, size_t n) {
  if (b->n + n > b->cap) {
    size_t cap = b->cap ? b->cap : 4096;
    char *p;
    while (cap < b->n + n) cap *= 2;
    p = realloc(b->p, cap);
    if (p == NULL) return 0;
    b->p = p;
    b->cap = cap;
  }
  memcpy(b->p + b->n, d, n);
  b->n += n;
  return 1;
}

static void closefd(int *fd) {
  if (*fd >= 0) close(*fd);
  *fd = -1;
}

static void proc_free(proc_op *p) {
  if (p->pid > 0 && !p->exited) {
    kill(-p->pid, SIGKILL); /* the child leads its own process group */
    kill(p->pid, SIGKILL);
    waitpid(p->pid, NULL, 0);
    p->exited = 1;
  }
  closefd(&p->in);
  closefd(&p->out);
  closefd(&p->err);
  closefd(&p->pidfd);
  free(p->stdin_data);
  free(p->obuf.p);
  free(p->ebuf.p);
  free(p->what);
  p->stdin_data = p->obuf.p = p->ebuf.p = p->what = NULL;
}

static int proc_gc(lua_State *L) {
  proc_op *p = lua_touserdata(L, 1);
  if (p->op.w.armed) kg_unwait(p->loop, &p->op.w);
  proc_free(p);
  return 0;
}

/* read until EAGAIN or EOF; returns 0 at EOF */
static int pump(int *fd, pbuf *b) {
  char tmp[CHUNK];
  for (;;) {
    ssize_t n = read(*fd, tmp, sizeof tmp);
    if (n > 0) { pbuf_add(b, tmp, (size_t)n); continue; }
    if (n == 0) { closefd(fd); return 0; }
    if (errno == EINTR) continue;
    if (errno == EAGAIN) return 1;
    closefd(fd);
    return 0;
  }
}

static void feed(proc_op *p) {
  while (p->in >= 0 && p->inoff < p->inlen) {
    ssize_t n = write(p->in, p->stdin_data + p->inoff, p->inlen - p->inoff);
    if (n > 0) { p->inoff += (size_t)n; continue; }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EAGAIN) return;
    closefd(&p->in); /* EPIPE: the child does not read stdin */
  }
  if (p->in >= 0 && p->inoff >= p->inlen) closefd(&p->in);
}

static int proc_step(lua_State *L, kg_op *op) {
  proc_op *p = (proc_op *)op;
  double now = kg_now(), until = p->deadline;
  if (p->deadline > 0 && now >= p->deadline) {
    lua_pushfstring(L, "command timed out after %f s: %s", p->timeout, p->what);
    proc_free(p); /* kills the child's process group */
    return kg_fail(L, "ETIMEDOUT", "%s", lua_tostring(L, -1));
  }
  feed(p);
  if (p->out >= 0) pump(&p->out, &p->obuf);
  if (p->err >= 0) pump(&p->err, &p->ebuf);
  if (p->out < 0 && p->err < 0 && !p->exited) {
    int st;
    if (waitpid(p->pid, &st, WNOHANG) == p->pid) {
      p->exited = 1;
      p->status = st;
    }
  }
  if (p->exited && p->out < 0 && p->err < 0) {
    lua_createtable(L, 0, 4);
    if (WIFEXITED(p->status)) lua_pushinteger(L, WEXITSTATUS(p->status));
    else lua_pushinteger(L, 128 + WTERMSIG(p->status));
    lua_setfield(L, -2, "code");
    if (WIFSIGNALED(p->status)) {
      lua_pushstring(L, sigabbrev_np(WTERMSIG(p->status)));
      lua_setfield(L, -2, "signal");
    }
    lua_pushlstring(L, p->obuf.p ? p->obuf.p : "", p->obuf.n);
    lua_setfield(L, -2, "stdout");
    lua_pushlstring(L, p->ebuf.p ? p->ebuf.p : "", p->ebuf.n);
    lua_setfield(L, -2, "stderr");
    proc_free(p);
    return 1;
  }
  if (p->out >= 0 || p->err >= 0 || p->in >= 0) {
    kg_want(op, p->out, POLLIN, until);
    kg_want_fd(op, p->err, POLLIN);
    kg_want_fd(op, p->in, POLLOUT);
  } else {
    /* pipes closed, child not reaped yet: its pidfd turns readable at exit */
    if (p->pidfd < 0 && (until == 0 || until > now + 0.01)) until = now + 0.01;
    kg_want(op, p->pidfd, POLLIN, until);
  }
  return KG_AGAIN;
}

static int make_pipe(int fds[2], int ours) {
  if (pipe2(fds, O_CLOEXEC) != 0) return -1;
  return fcntl(fds[ours], F_SETFL, fcntl(fds[ours], F_GETFL) | O_NONBLOCK);
}

/* argv from a table {"prog", "arg", ...} or a shell string */
static char **build_argv(lua_State *L, int idx, char **what) {
  char **argv;
  if (lua_type(L, idx) == LUA_TSTRING) {
    argv = calloc(4, sizeof *argv);
    argv[0] = strdup("/bin/sh");
    argv[1] = strdup("-c");
    argv[2] = strdup(lua_tostring(L, idx));
    *what = strdup(argv[2]);
  } else {
    lua_Integer i, n;
    luaL_Buffer b;
    luaL_checktype(L, idx, LUA_TTABLE);
    n = luaL_len(L, idx);
    if (n < 1) luaL_argerror(L, idx, "empty argv");
    argv = calloc((size_t)n + 1, sizeof *argv);
    luaL_buffinit(L, &b);
    for (i = 1; i <= n; i++) {
      lua_geti(L, idx, i);
      if (!lua_isstring(L, -1)) {
        size_t j;
        for (j = 0; j < (size_t)i - 1; j++) free(argv[j]);
        free(argv);
        luaL_error(L, "bad argv element #%d (string expected, got %s)", (int)i, luaL_typename(L, -1));
      }
      argv[i - 1] = strdup(lua_tostring(L, -1));
      lua_pop(L, 1);
    }
    for (i = 0; i < n; i++) {
      if (i) luaL_addchar(&b, ' ');
      luaL_addstring(&b, argv[i]);
    }
    luaL_pushresult(&b);
    *what = strdup(lua_tostring(L, -1));
    lua_pop(L, 1);
  }
  return argv;
}

static void free_strv(char **v) {
  size_t i;
  if (v == NULL) return;
  for (i = 0; v[i]; i++) free(v[i]);
  free(v);
}

/* environ plus overrides from a table {NAME = value} */
static char **build_env(lua_State *L, int t) {
  size_t n = 0, i, k = 0;
  char **env;
  for (i = 0; environ[i]; i++) n++;
  lua_pushnil(L);
  while (lua_next(L, t)) { n++; lua_pop(L, 1); }
  env = calloc(n + 1, sizeof *env);
  lua_pushnil(L);
  while (lua_next(L, t)) {
    const char *name = luaL_checkstring(L, -2);
    const char *val = luaL_tolstring(L, -1, NULL);
    char *e = malloc(strlen(name) + strlen(val) + 2);
    sprintf(e, "%s=%s", name, val);
    env[k++] = e;
    lua_pop(L, 2);
  }
  for (i = 0; environ[i]; i++) {
    const char *eq = strchr(environ[i], '=');
    size_t len = eq ? (size_t)(eq - environ[i]) : strlen(environ[i]);
    size_t j, dup = 0;
    for (j = 0; j < k && !dup; j++)
      if (strncmp(env[j], environ[i], len) == 0 && env[j][len] == '=') dup = 1;
    /* overrides come first, so skip the inherited copy */
    if (!dup) env[k++] = strdup(environ[i]);
  }
  return env;
}

/* proc.exec(argv or shell string, {stdin=, timeout=, env=, cwd=})
 * @return {code=, stdout=, stderr=} or nil, string, string */
static int l_exec(lua_State *L) {
  proc_op *p;
  char **argv, **env = NULL, *what = NULL;
  int pin[2] = {-1, -1}, pout[2] = {-1, -1}, perr[2] = {-1, -1}, rc;
  posix_spawn_file_actions_t fa;
  posix_spawnattr_t attr;
  const char *cwd = NULL;

  if (!lua_isnoneornil(L, 2)) luaL_checktype(L, 2, LUA_TTABLE);
  lua_settop(L, 2);
  p = lua_newuserdatauv(L, sizeof *p, 0); /* 3 */
  memset(p, 0, sizeof *p);
  luaL_setmetatable(L, PROC_MT);
  p->op.step = proc_step;
  p->loop = kg_loop_get(L);
  p->in = p->out = p->err = p->pidfd = -1;
  if (lua_istable(L, 2)) {
    size_t len;
    const char *in;
    if (lua_getfield(L, 2, "stdin") != LUA_TNIL) {
      in = luaL_checklstring(L, -1, &len);
      p->stdin_data = malloc(len ? len : 1);
      memcpy(p->stdin_data, in, len);
      p->inlen = len;
    }
    lua_pop(L, 1);
    if (lua_getfield(L, 2, "timeout") != LUA_TNIL) p->timeout = luaL_checknumber(L, -1);
    lua_pop(L, 1);
    if (lua_getfield(L, 2, "cwd") != LUA_TNIL) cwd = luaL_checkstring(L, -1);
    lua_pop(L, 1); /* anchored in the options table */
  }
  p->deadline = p->timeout > 0 ? kg_now() + p->timeout : 0;
  argv = build_argv(L, 1, &what);
  p->what = what;
  if (lua_istable(L, 2)) {
    if (lua_getfield(L, 2, "env") == LUA_TTABLE) env = build_env(L, lua_gettop(L));
    lua_pop(L, 1);
  }

  if (make_pipe(pin, 1) || make_pipe(pout, 0) || make_pipe(perr, 0)) {
    int e = errno;
    free_strv(argv); free_strv(env);
    closefd(&pin[0]); closefd(&pin[1]); closefd(&pout[0]); closefd(&pout[1]);
    closefd(&perr[0]); closefd(&perr[1]);
    return kg_fail(L, "EIO", "pipe: %s", strerror(e));
  }
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, pin[0], 0);
  posix_spawn_file_actions_adddup2(&fa, pout[1], 1);
  posix_spawn_file_actions_adddup2(&fa, perr[1], 2);
  if (cwd) posix_spawn_file_actions_addchdir_np(&fa, cwd);
  posix_spawnattr_init(&attr);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
  posix_spawnattr_setpgroup(&attr, 0); /* own group: a timeout kills the whole tree */
  {
    sigset_t none, all;
    sigemptyset(&none);
    sigfillset(&all);
    posix_spawnattr_setsigmask(&attr, &none);
    sigdelset(&all, SIGKILL);
    sigdelset(&all, SIGSTOP);
    posix_spawnattr_setsigdefault(&attr, &all);
  }
  rc = posix_spawnp(&p->pid, argv[0], &fa, &attr, argv, env ? env : environ);
  posix_spawn_file_actions_destroy(&fa);
  posix_spawnattr_destroy(&attr);
  close(pin[0]);
  close(pout[1]);
  close(perr[1]);
  p->in = pin[1];
  p->out = pout[0];
  p->err = perr[0];
  if (rc != 0) {
    p->pid = 0;
    lua_pushfstring(L, "%s: %s", argv[0], strerror(rc));
    free_strv(argv); free_strv(env);
    proc_free(p);
    return kg_fail(L, rc == ENOENT ? "ENOENT" : "EACCES", "%s", lua_tostring(L, -1));
  }
  free_strv(argv);
  free_strv(env);
#ifdef SYS_pidfd_open
  p->pidfd = (int)syscall(SYS_pidfd_open, p->pid, 0);
#endif
  if (p->inlen == 0) closefd(&p->in);
  lua_settop(L, 3);
  return kg_drive(L, 3);
}

/* proc.read_file(path) -> content or nil, string, string */
static int l_read_file(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  luaL_Buffer b;
  char tmp[CHUNK];
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return kg_fail(L, errno == ENOENT ? "ENOENT" : "EACCES", "%s: %s", path, strerror(errno));
  luaL_buffinit(L, &b);
  for (;;) {
    ssize_t n = read(fd, tmp, sizeof tmp);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      int e = errno;
      close(fd);
      return kg_fail(L, "EIO", "%s: %s", path, strerror(e));
    }
    if (n == 0) break;
    luaL_addlstring(&b, tmp, (size_t)n);
  }
  close(fd);
  luaL_pushresult(&b);
  return 1;
}

/* proc.write_file(path, content, {mode="0644"}) -> true or nil, string, string
 * Atomic: readers see the old file or the new one, never a part. */
static int l_write_file(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  size_t len, off = 0;
  const char *data = luaL_checklstring(L, 2, &len);
  mode_t mode = 0644;
  char *tmp;
  int fd, e;
  if (lua_istable(L, 3)) {
    if (lua_getfield(L, 3, "mode") != LUA_TNIL) {
      const char *m = luaL_checkstring(L, -1);
      char *end;
      mode = (mode_t)strtol(m, &end, 8);
      if (*end || end == m) return luaL_error(L, "bad option 'mode' (octal digits expected, got '%s')", m);
    }
    lua_pop(L, 1);
  }
  tmp = malloc(strlen(path) + 16);
  sprintf(tmp, "%s.kgXXXXXX", path);
  fd = mkostemp(tmp, O_CLOEXEC);
  if (fd < 0) {
    e = errno;
    free(tmp);
    return kg_fail(L, e == ENOENT ? "ENOENT" : "EACCES", "%s: %s", path, strerror(e));
  }
  while (off < len) {
    ssize_t n = write(fd, data + off, len - off);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) goto fail;
    off += (size_t)n;
  }
  if (fchmod(fd, mode) != 0 || fsync(fd) != 0) goto fail;
  if (close(fd) != 0) { fd = -1; goto fail; }
  fd = -1;
  if (rename(tmp, path) != 0) goto fail;
  free(tmp);
  lua_pushboolean(L, 1);
  return 1;
fail:
  e = errno;
  if (fd >= 0) close(fd);
  unlink(tmp);
  free(tmp);
  return kg_fail(L, e == ENOENT ? "ENOENT" : e == EACCES ? "EACCES" : "EIO", "%s: %s", path, strerror(e));
}

static int l_getenv(lua_State *L) {
  const char *v = getenv(luaL_checkstring(L, 1));
  if (v) lua_pushstring(L, v);
  else lua_pushnil(L);
  return 1;
}

static const luaL_Reg funcs[] = {
  {"exec", l_exec},
  {"read_file", l_read_file},
  {"write_file", l_write_file},
  {"getenv", l_getenv},
  {NULL, NULL}
};

int luaopen_kengine_proc(lua_State *L) {
  kg_loop_get(L);
  signal(SIGPIPE, SIG_IGN); /* a child that closes stdin must not kill us */
  if (luaL_newmetatable(L, PROC_MT)) {
    lua_pushcfunction(L, proc_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
  luaL_newlib(L, funcs);
  return 1;
}
