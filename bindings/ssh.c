/*
 * ssh.c - kengine.ssh: non-blocking SSH sessions over libssh.
 *
 * One TCP connection per session; every command is a channel on it, so many
 * coroutines can exec on one session at once.  Sessions run in libssh's
 * non-blocking mode and every wait yields to the engine loop (loop.h).
 * Files travel through exec + stdin/stdout ("cat"), which streams, is
 * binary-safe and needs nothing on the target but a POSIX shell; writes land
 * in a temporary file in the target directory and are renamed into place.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <libssh/callbacks.h>
#include <libssh/libssh.h>

#include "../engine/loop.h"

#define SESSION_MT "kengine.ssh.session"
#define CONNECT_MT "kengine.ssh.connect"
#define EXEC_MT "kengine.ssh.exec"
#define DEFAULT_CONNECT_TIMEOUT 30.0
#define DEFAULT_MAX_CHANNELS 10 /* OpenSSH's MaxSessions default */
#define CHUNK 32768

typedef struct {
  ssh_session ssh; /* NULL: closed */
  char *label;     /* user@host:port, for messages */
  int nchan, maxchan;
  kg_waitq slots;  /* operations waiting for a free channel */
  kg_loop *loop;
  struct ssh_counter_struct tx, rx; /* rx.in_packets: packets processed so far */
} session_t;

#define checksession(L) ((session_t *)luaL_checkudata(L, 1, SESSION_MT))

static session_t *opensession(lua_State *L) {
  session_t *s = checksession(L);
  if (s->ssh == NULL) luaL_error(L, "attempt to use a closed session");
  return s;
}

/* ---- error mapping ------------------------------------------------------ */

static const char *classify(const char *msg) {
  static const struct { const char *needle, *code; } map[] = {
    {"refused", "ECONNREFUSED"},
    {"timed out", "ETIMEDOUT"},
    {"Timeout", "ETIMEDOUT"},
    {"unreachable", "EHOSTUNREACH"},
    {"No route", "EHOSTUNREACH"},
    {"resolve", "EHOSTUNREACH"},
    {"Name or service", "EHOSTUNREACH"},
    {"getaddrinfo", "EHOSTUNREACH"},
    {"Temporary failure in name", "EHOSTUNREACH"},
  };
  size_t i;
  for (i = 0; i < sizeof map / sizeof map[0]; i++)
    if (msg && strstr(msg, map[i].needle)) return map[i].code;
  return "EPROTO";
}

/* ---- small helpers ------------------------------------------------------ */

typedef struct {
  char *p;
  size_t n, cap;
} buf_t;

static int buf_add(buf_t *b, const char *data, size_t n) {
  if (b->n + n > b->cap) {
    size_t cap = b->cap ? b->cap : 4096;
    char *p;
    while (cap < b->n + n) cap *= 2;
    p = realloc(b->p, cap);
    if (p == NULL) return 0;
    b->p = p;
    b->cap = cap;
  }
  memcpy(b->p + b->n, data, n);
  b->n += n;
  return 1;
}

static char *xstrdup(const char *s) { return s ? strdup(s) : NULL; }

static char *expand_home(const char *path) {
  const char *home = getenv("HOME");
  char *r;
  if (path[0] != '~' || path[1] != '/' || home == NULL) return strdup(path);
  r = malloc(strlen(home) + strlen(path));
  if (r) sprintf(r, "%s%s", home, path + 1);
  return r;
}

/* shell single-quoting: abc'd -> 'abc'\''d' */
static void addquoted(luaL_Buffer *b, const char *s) {
  luaL_addchar(b, '\'');
  for (; *s; s++) {
    if (*s == '\'') luaL_addstring(b, "'\\''");
    else luaL_addchar(b, *s);
  }
  luaL_addchar(b, '\'');
}

/*
 * Before every wait: ask for immediate ACKs.  sshd sends an unsolicited
 * hostkeys message right after login; with our ACK delayed, its Nagle holds
 * the reply to our first channel open for ~40 ms (measured in bench/).  The
 * flag does not persist in Linux, hence on every wait.
 */
static void quickack(int fd) {
#ifdef TCP_QUICKACK
  int one = 1;
  if (fd >= 0) setsockopt(fd, IPPROTO_TCP, TCP_QUICKACK, &one, sizeof one);
#else
  (void)fd;
#endif
}

static short ssh_events(ssh_session ssh) {
  int f = ssh_get_poll_flags(ssh);
  return (short)(POLLIN | ((f & SSH_WRITE_PENDING) ? POLLOUT : 0));
}

static double opt_timeout(lua_State *L, int t, const char *key, double def) {
  double v = def;
  if (lua_type(L, t) == LUA_TTABLE) {
    if (lua_getfield(L, t, key) != LUA_TNIL) v = luaL_checknumber(L, -1);
    lua_pop(L, 1);
  }
  return v;
}

/* ---- connect --------------------------------------------------------------- */

enum { HK_STRICT, HK_ACCEPT_NEW, HK_OFF };
enum { C_CONNECT, C_HOSTKEY, C_AUTH_AGENT, C_AUTH_KEY, C_AUTH_PASSWORD, C_DONE };

typedef struct {
  kg_op op;
  int phase;
  ssh_session ssh;
  double deadline, timeout;
  char *label, *known_hosts, *password;
  char **idents;
  int nident, ident_i, idents_explicit;
  ssh_key key;     /* the identity being tried */
  int agent, policy, maxchan;
  char tried[200];
} connect_op;

static void connect_free(connect_op *c) {
  int i;
  if (c->key) ssh_key_free(c->key);
  if (c->ssh) { ssh_disconnect(c->ssh); ssh_free(c->ssh); }
  if (c->password) { explicit_bzero(c->password, strlen(c->password)); free(c->password); }
  for (i = 0; i < c->nident; i++) free(c->idents[i]);
  free(c->idents);
  free(c->label);
  free(c->known_hosts);
  memset(c, 0, sizeof *c);
}

static int connect_gc(lua_State *L) {
  connect_op *c = lua_touserdata(L, 1);
  if (c->op.w.armed) kg_unwait(kg_loop_get(L), &c->op.w);
  connect_free(c);
  return 0;
}

static void tried(connect_op *c, const char *what) {
  size_t n = strlen(c->tried);
  snprintf(c->tried + n, sizeof c->tried - n, "%s%s", n ? ", " : "", what);
}

static int connect_fail(lua_State *L, connect_op *c, const char *code, const char *fmt, const char *arg) {
  char msg[512];
  snprintf(msg, sizeof msg, fmt, arg);
  lua_pushfstring(L, "%s: %s: %s", code, c->label, msg);
  luaL_pushfail(L);
  lua_insert(L, -2);
  lua_pushstring(L, code);
  connect_free(c);
  return 3;
}

static int host_key_check(lua_State *L, connect_op *c) {
  ssh_key srv = NULL;
  unsigned char *hash = NULL;
  size_t hlen = 0;
  char *fp = NULL, fpbuf[128] = "?";
  enum ssh_known_hosts_e st;
  const char *kh = c->known_hosts ? c->known_hosts : "~/.ssh/known_hosts";
  char msg[400];

  if (ssh_get_server_publickey(c->ssh, &srv) == SSH_OK &&
      ssh_get_publickey_hash(srv, SSH_PUBLICKEY_HASH_SHA256, &hash, &hlen) == SSH_OK) {
    fp = ssh_get_fingerprint_hash(SSH_PUBLICKEY_HASH_SHA256, hash, hlen);
    if (fp) snprintf(fpbuf, sizeof fpbuf, "%s", fp);
  }
  ssh_string_free_char(fp);
  ssh_clean_pubkey_hash(&hash);
  ssh_key_free(srv);
  if (c->policy == HK_OFF) return 0;
  st = ssh_session_is_known_server(c->ssh);
  switch (st) {
  case SSH_KNOWN_HOSTS_OK:
    return 0;
  case SSH_KNOWN_HOSTS_CHANGED:
  case SSH_KNOWN_HOSTS_OTHER:
    snprintf(msg, sizeof msg,
             "host key changed (now %s), refusing to connect: possible man-in-the-middle; "
             "if the change is expected, remove the old entry from %s", fpbuf, kh);
    return connect_fail(L, c, "EHOSTKEY", "%s", msg);
  case SSH_KNOWN_HOSTS_UNKNOWN:
  case SSH_KNOWN_HOSTS_NOT_FOUND:
    if (c->policy == HK_ACCEPT_NEW) {
      if (ssh_session_update_known_hosts(c->ssh) != SSH_OK)
        return connect_fail(L, c, "EHOSTKEY", "cannot record host key: %s", ssh_get_error(c->ssh));
      return 0;
    }
    snprintf(msg, sizeof msg,
             "unknown host key %s: not in %s (host_key=\"strict\"); add it, or connect once with "
             "host_key=\"accept-new\"", fpbuf, kh);
    return connect_fail(L, c, "EHOSTKEY", "%s", msg);
  default:
    return connect_fail(L, c, "EHOSTKEY", "cannot check host key: %s", ssh_get_error(c->ssh));
  }
}

static int connect_step(lua_State *L, kg_op *op) {
  connect_op *c = (connect_op *)op;
  int rc;
  if (c->ssh == NULL) return luaL_error(L, "connect operation reused");
  if (op->w.timed_out)
    return connect_fail(L, c, "ETIMEDOUT", "timed out after %s s", lua_pushfstring(L, "%f", c->timeout));
  for (;;) {
    switch (c->phase) {
    case C_CONNECT:
      rc = ssh_connect(c->ssh);
      if (rc == SSH_AGAIN) goto again;
      if (rc != SSH_OK) {
        const char *e = ssh_get_error(c->ssh);
        return connect_fail(L, c, classify(e), "%s", e);
      }
      c->phase = C_HOSTKEY;
      break;
    case C_HOSTKEY:
      if ((rc = host_key_check(L, c)) != 0) return rc;
      c->phase = c->agent ? C_AUTH_AGENT : C_AUTH_KEY;
      break;
    case C_AUTH_AGENT:
      rc = ssh_userauth_agent(c->ssh, NULL);
      if (rc == SSH_AUTH_AGAIN) goto again;
      if (rc == SSH_AUTH_SUCCESS) goto done;
      if (rc == SSH_AUTH_ERROR && ssh_get_error_code(c->ssh) == SSH_FATAL)
        return connect_fail(L, c, "EPROTO", "%s", ssh_get_error(c->ssh));
      tried(c, "agent");
      c->phase = C_AUTH_KEY;
      break;
    case C_AUTH_KEY:
      if (c->key == NULL) {
        if (c->ident_i >= c->nident) { c->phase = C_AUTH_PASSWORD; break; }
        rc = ssh_pki_import_privkey_file(c->idents[c->ident_i], NULL, NULL, NULL, &c->key);
        if (rc != SSH_OK) {
          int missing = access(c->idents[c->ident_i], R_OK) != 0;
          c->key = NULL;
          if (c->idents_explicit)
            return connect_fail(L, c, missing ? "ENOENT" : "EAUTH",
                                missing ? "identity file not readable: %s"
                                        : "cannot load identity (encrypted or invalid): %s",
                                c->idents[c->ident_i]);
          c->ident_i++;
          break;
        }
      }
      rc = ssh_userauth_publickey(c->ssh, NULL, c->key);
      if (rc == SSH_AUTH_AGAIN) goto again;
      ssh_key_free(c->key);
      c->key = NULL;
      if (rc == SSH_AUTH_SUCCESS) goto done;
      if (rc == SSH_AUTH_ERROR)
        return connect_fail(L, c, "EPROTO", "%s", ssh_get_error(c->ssh));
      tried(c, c->idents[c->ident_i]);
      c->ident_i++;
      break;
    case C_AUTH_PASSWORD:
      if (c->password == NULL) {
        return connect_fail(L, c, "EAUTH", "authentication failed (tried: %s)",
                            c->tried[0] ? c->tried : "no method: no identity, agent or password");
      }
      rc = ssh_userauth_password(c->ssh, NULL, c->password);
      if (rc == SSH_AUTH_AGAIN) goto again;
      if (rc == SSH_AUTH_SUCCESS) goto done;
      if (rc == SSH_AUTH_ERROR)
        return connect_fail(L, c, "EPROTO", "%s", ssh_get_error(c->ssh));
      tried(c, "password");
      explicit_bzero(c->password, strlen(c->password));
      free(c->password);
      c->password = NULL;
      break;
    default:
      return luaL_error(L, "bad connect state");
    }
  }
again:
  quickack(ssh_get_fd(c->ssh));
  kg_want(op, ssh_get_fd(c->ssh), ssh_events(c->ssh), c->deadline);
  return KG_AGAIN;
done: {
    session_t *s = lua_newuserdatauv(L, sizeof *s, 0);
    memset(s, 0, sizeof *s);
    luaL_setmetatable(L, SESSION_MT);
    s->ssh = c->ssh;
    s->label = c->label;
    s->maxchan = c->maxchan;
    s->loop = kg_loop_get(L);
    c->ssh = NULL;
    c->label = NULL;
    ssh_set_counters(s->ssh, &s->tx, &s->rx);
    connect_free(c);
    return 1;
  }
}

static int opt_string(lua_State *L, int t, const char *key, const char **out) {
  int ty = lua_getfield(L, t, key);
  if (ty == LUA_TNIL) { lua_pop(L, 1); return 0; }
  if (ty != LUA_TSTRING && ty != LUA_TNUMBER)
    return luaL_error(L, "bad option '%s' to 'connect' (string expected, got %s)", key, luaL_typename(L, -1));
  *out = lua_tostring(L, -1);
  lua_pop(L, 1); /* still anchored in the options table */
  return 1;
}

static void add_ident(connect_op *c, const char *path) {
  char **n = realloc(c->idents, (size_t)(c->nident + 1) * sizeof *n);
  if (n == NULL) return;
  c->idents = n;
  c->idents[c->nident++] = expand_home(path);
}

/* ssh.connect{host=, port=, user=, identity=, password=, agent=, known_hosts=,
 *             host_key=, timeout=, config=, max_channels=}
 * @return session or nil, string, string */
static int l_connect(lua_State *L) {
  const char *host = NULL, *user = NULL, *kh = NULL, *pw = NULL, *policy = "strict";
  const char *ruser = NULL;
  char *u = NULL;
  int port = 22, config = 1, agent_set = 0, agent = 1, verbosity = SSH_LOG_NOLOG;
  unsigned int uport;
  long nodelay = 1;
  connect_op *c;

  luaL_checktype(L, 1, LUA_TTABLE);
  lua_settop(L, 1);
  if (!opt_string(L, 1, "host", &host)) return luaL_error(L, "bad option 'host' to 'connect' (string expected)");
  opt_string(L, 1, "user", &user);
  opt_string(L, 1, "known_hosts", &kh);
  opt_string(L, 1, "password", &pw);
  opt_string(L, 1, "host_key", &policy);
  if (lua_getfield(L, 1, "port") != LUA_TNIL) port = (int)luaL_checkinteger(L, -1);
  lua_pop(L, 1);
  if (lua_getfield(L, 1, "config") != LUA_TNIL) config = lua_toboolean(L, -1);
  lua_pop(L, 1);
  if (lua_getfield(L, 1, "agent") != LUA_TNIL) { agent_set = 1; agent = lua_toboolean(L, -1); }
  lua_pop(L, 1);

  c = lua_newuserdatauv(L, sizeof *c, 0); /* index 2 */
  memset(c, 0, sizeof *c);
  luaL_setmetatable(L, CONNECT_MT);
  c->op.step = connect_step;
  c->timeout = opt_timeout(L, 1, "timeout", DEFAULT_CONNECT_TIMEOUT);
  c->deadline = kg_now() + c->timeout;
  c->maxchan = DEFAULT_MAX_CHANNELS;
  if (lua_getfield(L, 1, "max_channels") != LUA_TNIL) c->maxchan = (int)luaL_checkinteger(L, -1);
  lua_pop(L, 1);
  if (c->maxchan < 1) c->maxchan = 1;
  if (strcmp(policy, "strict") == 0) c->policy = HK_STRICT;
  else if (strcmp(policy, "accept-new") == 0) c->policy = HK_ACCEPT_NEW;
  else if (strcmp(policy, "off") == 0) c->policy = HK_OFF;
  else return luaL_error(L, "bad option 'host_key' to 'connect' (\"strict\", \"accept-new\" or \"off\" expected, got \"%s\")", policy);

  switch (lua_getfield(L, 1, "identity")) {
  case LUA_TNIL: break;
  case LUA_TSTRING: add_ident(c, lua_tostring(L, -1)); c->idents_explicit = 1; break;
  case LUA_TTABLE: {
    lua_Integer i, n = luaL_len(L, -1);
    for (i = 1; i <= n; i++) {
      lua_geti(L, -1, i);
      add_ident(c, luaL_checkstring(L, -1));
      lua_pop(L, 1);
    }
    c->idents_explicit = 1;
    break;
  }
  default:
    return luaL_error(L, "bad option 'identity' to 'connect' (string or table expected)");
  }
  lua_pop(L, 1);
  if (!c->idents_explicit) {
    static const char *const defaults[] = {"~/.ssh/id_ed25519", "~/.ssh/id_ecdsa", "~/.ssh/id_rsa"};
    size_t i;
    for (i = 0; i < sizeof defaults / sizeof defaults[0]; i++) add_ident(c, defaults[i]);
  }
  /* an explicit identity means "this key", as IdentitiesOnly does */
  c->agent = agent_set ? agent : !c->idents_explicit;
  if (c->agent && getenv("SSH_AUTH_SOCK") == NULL) c->agent = 0;
  c->password = xstrdup(pw);
  c->known_hosts = kh ? expand_home(kh) : NULL;

  c->ssh = ssh_new();
  if (c->ssh == NULL) return luaL_error(L, "ssh_new failed");
  ssh_options_set(c->ssh, SSH_OPTIONS_LOG_VERBOSITY, &verbosity);
  ssh_options_set(c->ssh, SSH_OPTIONS_HOST, host);
  if (config) ssh_options_parse_config(c->ssh, NULL);
  {
    int no = 0;
    ssh_options_set(c->ssh, SSH_OPTIONS_PROCESS_CONFIG, &no);
  }
  /* explicit options win over ~/.ssh/config */
  lua_getfield(L, 1, "port");
  if (!lua_isnil(L, -1) || !config) { uport = (unsigned)port; ssh_options_set(c->ssh, SSH_OPTIONS_PORT, &uport); }
  lua_pop(L, 1);
  if (user) ssh_options_set(c->ssh, SSH_OPTIONS_USER, user);
  if (c->known_hosts) ssh_options_set(c->ssh, SSH_OPTIONS_KNOWNHOSTS, c->known_hosts);
  ssh_options_set(c->ssh, SSH_OPTIONS_NODELAY, &nodelay); /* DESIGN 3: 26 ms vs 105 ms */
  ssh_set_blocking(c->ssh, 0);

  if (ssh_options_get(c->ssh, SSH_OPTIONS_USER, &u) == SSH_OK) ruser = u;
  {
    unsigned int p = 22;
    ssh_options_get_port(c->ssh, &p);
    lua_pushfstring(L, "%s@%s:%d", ruser ? ruser : "?", host, (int)p);
    c->label = strdup(lua_tostring(L, -1));
    lua_pop(L, 1);
  }
  ssh_string_free_char(u);
  return kg_drive(L, 2);
}

/* ---- session ---------------------------------------------------------------- */

static void session_close(lua_State *L, session_t *s) {
  if (s->ssh == NULL) return;
  ssh_disconnect(s->ssh);
  ssh_free(s->ssh); /* frees the session's channels too */
  s->ssh = NULL;
  if (s->loop) kg_waitq_wake_all(s->loop, &s->slots);
  (void)L;
}

static int s_close(lua_State *L) {
  session_t *s = checksession(L);
  session_close(L, s);
  return 0;
}

static int s_gc(lua_State *L) {
  session_t *s = checksession(L);
  session_close(L, s);
  free(s->label);
  s->label = NULL;
  return 0;
}

static int s_tostring(lua_State *L) {
  session_t *s = checksession(L);
  if (s->ssh) lua_pushfstring(L, "kengine.ssh.session (%s)", s->label);
  else lua_pushliteral(L, "kengine.ssh.session (closed)");
  return 1;
}

static int s_target(lua_State *L) {
  session_t *s = checksession(L);
  lua_pushstring(L, s->label ? s->label : "?");
  return 1;
}

static int s_isopen(lua_State *L) {
  session_t *s = checksession(L);
  lua_pushboolean(L, s->ssh != NULL && ssh_is_connected(s->ssh));
  return 1;
}

/* ---- exec: one channel, stdin from a string or a file, stdout to memory or a file */

enum { X_SLOT, X_OPEN, X_EXEC, X_IO, X_STATUS, X_DONE };
enum { K_EXEC, K_PUT, K_GET, K_DOWNLOAD };

typedef struct {
  kg_op op;
  session_t *s;
  kg_loop *loop;
  ssh_channel ch;
  struct ssh_channel_callbacks_struct cb;
  int phase, kind, has_slot;
  char *cmd;
  char *in;           /* stdin string */
  size_t inlen, inoff;
  int in_fd;          /* or stdin from a local file (-1: none) */
  char *inbuf;        /* CHUNK bytes, for in_fd only: most execs never need it */
  size_t inbuf_len, inbuf_off;
  int in_eof, eof_sent;
  int out_fd;         /* stdout to a local file (-1: memory) */
  buf_t out, err;
  int out_eof, err_eof;
  double deadline, timeout;
  int exit_status;
  char signal[32];
  uint64_t seen;      /* packets processed when we last looked */
  char *local_path, *local_tmp; /* download target */
} exec_op;

static void exec_release(exec_op *e) {
  if (e->ch && e->s->ssh) {
    ssh_remove_channel_callbacks(e->ch, &e->cb);
    ssh_channel_close(e->ch);
    ssh_channel_free(e->ch);
  }
  e->ch = NULL;
  if (e->has_slot) {
    e->has_slot = 0;
    e->s->nchan--;
    kg_waitq_wake_one(e->loop, &e->s->slots);
  }
}

static void exec_free(exec_op *e) {
  exec_release(e);
  if (e->in) { explicit_bzero(e->in, e->inlen); free(e->in); }
  e->in = NULL;
  free(e->cmd); e->cmd = NULL;
  free(e->inbuf); e->inbuf = NULL;
  free(e->out.p); e->out.p = NULL;
  free(e->err.p); e->err.p = NULL;
  if (e->in_fd >= 0) close(e->in_fd);
  if (e->out_fd >= 0) close(e->out_fd);
  e->in_fd = e->out_fd = -1;
  if (e->local_tmp) unlink(e->local_tmp);
  free(e->local_tmp); e->local_tmp = NULL;
  free(e->local_path); e->local_path = NULL;
}

static int exec_gc(lua_State *L) {
  exec_op *e = lua_touserdata(L, 1);
  if (e->op.w.armed) kg_unwait(e->loop, &e->op.w);
  if (e->s) exec_free(e);
  e->s = NULL;
  return 0;
}

static void on_exit_signal(ssh_session session, ssh_channel channel, const char *sig, int core,
                           const char *errmsg, const char *lang, void *userdata) {
  exec_op *e = userdata;
  (void)session; (void)channel; (void)core; (void)errmsg; (void)lang;
  snprintf(e->signal, sizeof e->signal, "%s", sig ? sig : "?");
}

/* Ready without a socket event: another operation on this session has
 * processed packets since we looked, and some may have been ours. */
static int exec_ready(kg_waiter *w) {
  exec_op *e = w->ready_ud;
  return e->s->ssh == NULL || e->s->rx.in_packets != e->seen;
}

static int exec_wait(exec_op *e) {
  quickack(ssh_get_fd(e->s->ssh));
  kg_want(&e->op, ssh_get_fd(e->s->ssh), ssh_events(e->s->ssh), e->deadline);
  e->op.w.ready = exec_ready;
  e->op.w.ready_ud = e;
  return KG_AGAIN;
}

static int exec_error(lua_State *L, exec_op *e, const char *code, const char *what) {
  lua_pushfstring(L, "%s: %s: %s", code, e->s->label, what);
  luaL_pushfail(L);
  lua_insert(L, -2);
  lua_pushstring(L, code);
  exec_free(e);
  return 3;
}

static int ssh_error(lua_State *L, exec_op *e, const char *during) {
  const char *msg = e->s->ssh ? ssh_get_error(e->s->ssh) : "session closed";
  lua_pushfstring(L, "%s: %s", during, msg);
  return exec_error(L, e, e->s->ssh ? classify(msg) : "ECLOSED", lua_tostring(L, -1));
}

/* read what is buffered; returns 0 on a transport error */
static int drain(exec_op *e, int is_stderr) {
  char tmp[CHUNK];
  int *eof = is_stderr ? &e->err_eof : &e->out_eof;
  while (!*eof) {
    int n = ssh_channel_read_nonblocking(e->ch, tmp, sizeof tmp, is_stderr);
    if (n == SSH_EOF) { *eof = 1; break; }
    if (n < 0) {
      if (ssh_channel_is_eof(e->ch) || ssh_channel_is_closed(e->ch)) { *eof = 1; break; }
      return 0;
    }
    if (n == 0) {
      if (ssh_channel_is_eof(e->ch)) *eof = 1;
      break;
    }
    if (!is_stderr && e->out_fd >= 0) {
      ssize_t off = 0;
      while (off < n) {
        ssize_t w = write(e->out_fd, tmp + off, (size_t)(n - off));
        if (w < 0) { if (errno == EINTR) continue; return 0; }
        off += w;
      }
    } else if (!buf_add(is_stderr ? &e->err : &e->out, tmp, (size_t)n)) {
      return 0;
    }
  }
  return 1;
}

/* push as much stdin as the window takes; returns 0 on a transport error */
static int feed(exec_op *e) {
  for (;;) {
    const char *p;
    size_t avail;
    uint32_t win;
    int n;
    if (e->in_fd >= 0) {
      if (e->inbuf_off == e->inbuf_len && !e->in_eof) {
        ssize_t r = read(e->in_fd, e->inbuf, CHUNK);
        if (r < 0) { if (errno == EINTR) continue; return 0; }
        if (r == 0) e->in_eof = 1;
        e->inbuf_len = (size_t)r;
        e->inbuf_off = 0;
      }
      p = e->inbuf + e->inbuf_off;
      avail = e->inbuf_len - e->inbuf_off;
    } else {
      p = e->in ? e->in + e->inoff : NULL;
      avail = e->in ? e->inlen - e->inoff : 0;
      if (avail == 0) e->in_eof = 1;
    }
    if (avail == 0) {
      if (e->in_eof && !e->eof_sent) {
        if (ssh_channel_send_eof(e->ch) == SSH_ERROR) return 0;
        e->eof_sent = 1;
      }
      return 1;
    }
    win = ssh_channel_window_size(e->ch);
    if (win == 0) return 1;
    if (avail > win) avail = win;
    if (avail > CHUNK) avail = CHUNK;
    n = ssh_channel_write(e->ch, p, (uint32_t)avail);
    if (n == SSH_ERROR) return 0;
    if (n == 0) return 1;
    if (e->in_fd >= 0) e->inbuf_off += (size_t)n;
    else e->inoff += (size_t)n;
  }
}

static int exec_result(lua_State *L, exec_op *e);

static int exec_step(lua_State *L, kg_op *op) {
  exec_op *e = (exec_op *)op;
  int rc;
  if (e->s->ssh == NULL) {
    e->ch = NULL; /* freed with the session */
    return exec_error(L, e, "ECLOSED", "session closed while a command was running");
  }
  if (op->w.timed_out) {
    if (e->ch) ssh_channel_request_send_signal(e->ch, "KILL"); /* best effort */
    if (getenv("KENGINE_DEBUG_SSH"))
      fprintf(stderr, "timeout: phase=%d out_eof=%d err_eof=%d eof_sent=%d status=%d closed=%d eof=%d\n", e->phase,
              e->out_eof, e->err_eof, e->eof_sent, e->ch ? ssh_channel_get_exit_status(e->ch) : -2,
              e->ch ? ssh_channel_is_closed(e->ch) : -2, e->ch ? ssh_channel_is_eof(e->ch) : -2);
    lua_pushfstring(L, "command timed out after %f s: %s", e->timeout, e->cmd);
    return exec_error(L, e, "ETIMEDOUT", lua_tostring(L, -1));
  }
  /* Packets processed from here on, by this step or any other operation,
   * make the wait below end at once: one of them may have been ours. */
  e->seen = e->s->rx.in_packets;
  for (;;) {
    switch (e->phase) {
    case X_SLOT:
      if (e->s->nchan >= e->s->maxchan) {
        kg_want_queue(op, &e->s->slots, e->deadline);
        return KG_AGAIN;
      }
      e->s->nchan++;
      e->has_slot = 1;
      e->ch = ssh_channel_new(e->s->ssh);
      if (e->ch == NULL) return ssh_error(L, e, "cannot create channel");
      memset(&e->cb, 0, sizeof e->cb);
      e->cb.userdata = e;
      e->cb.channel_exit_signal_function = on_exit_signal;
      ssh_callbacks_init(&e->cb);
      ssh_set_channel_callbacks(e->ch, &e->cb);
      e->phase = X_OPEN;
      break;
    case X_OPEN:
      rc = ssh_channel_open_session(e->ch);
      if (rc == SSH_AGAIN) return exec_wait(e);
      if (rc != SSH_OK) return ssh_error(L, e, "cannot open channel");
      e->phase = X_EXEC;
      break;
    case X_EXEC:
      rc = ssh_channel_request_exec(e->ch, e->cmd);
      if (rc == SSH_AGAIN) return exec_wait(e);
      if (rc != SSH_OK) return ssh_error(L, e, "exec request failed");
      e->phase = X_IO;
      break;
    case X_IO:
      if (!feed(e)) return ssh_error(L, e, "writing stdin");
      if (!drain(e, 0)) return ssh_error(L, e, "reading stdout");
      if (!drain(e, 1)) return ssh_error(L, e, "reading stderr");
      if (!(e->out_eof && e->err_eof)) return exec_wait(e);
      e->phase = X_STATUS;
      break;
    case X_STATUS:
      rc = ssh_channel_get_exit_status(e->ch);
      if (rc == -1 && !ssh_channel_is_closed(e->ch) && !e->signal[0]) {
        if (ssh_get_status(e->s->ssh) & (SSH_CLOSED | SSH_CLOSED_ERROR))
          return ssh_error(L, e, "waiting for exit status");
        return exec_wait(e);
      }
      e->exit_status = rc;
      e->phase = X_DONE;
      break;
    default:
      return exec_result(L, e);
    }
  }
}

static int exec_result(lua_State *L, exec_op *e) {
  int code = e->exit_status;
  const char *sig = e->signal[0] ? e->signal : NULL;
  switch (e->kind) {
  case K_EXEC:
    lua_createtable(L, 0, 4);
    if (code == -1 && sig) code = 128 + 9; /* shell convention for a signal; the name below */
    lua_pushinteger(L, code);
    lua_setfield(L, -2, "code");
    lua_pushlstring(L, e->out.p ? e->out.p : "", e->out.n);
    lua_setfield(L, -2, "stdout");
    lua_pushlstring(L, e->err.p ? e->err.p : "", e->err.n);
    lua_setfield(L, -2, "stderr");
    if (sig) { lua_pushstring(L, sig); lua_setfield(L, -2, "signal"); }
    exec_free(e);
    return 1;
  default: {
    char tail[300];
    size_t n = e->err.n > 250 ? 250 : e->err.n;
    const char *code_s;
    if (code == 0) {
      if (e->kind == K_GET) {
        lua_pushlstring(L, e->out.p ? e->out.p : "", e->out.n);
      } else if (e->kind == K_DOWNLOAD) {
        if (fsync(e->out_fd) != 0 || close(e->out_fd) != 0 || rename(e->local_tmp, e->local_path) != 0) {
          e->out_fd = -1;
          return exec_error(L, e, "EIO", strerror(errno));
        }
        e->out_fd = -1;
        free(e->local_tmp);
        e->local_tmp = NULL;
        lua_pushboolean(L, 1);
      } else {
        lua_pushboolean(L, 1);
      }
      exec_free(e);
      return 1;
    }
    memcpy(tail, e->err.p ? e->err.p + (e->err.n - n) : "", n);
    tail[n] = 0;
    while (n > 0 && (tail[n - 1] == '\n' || tail[n - 1] == '\r')) tail[--n] = 0;
    if (strstr(tail, "No such file")) code_s = "ENOENT";
    else if (strstr(tail, "ermission denied") || strstr(tail, "Read-only")) code_s = "EACCES";
    else code_s = "EIO";
    return exec_error(L, e, code_s, n ? tail : "remote command failed");
  }
  }
}

static exec_op *new_exec(lua_State *L, session_t *s, int kind, double timeout) {
  exec_op *e = lua_newuserdatauv(L, sizeof *e, 0);
  memset(e, 0, sizeof *e);
  luaL_setmetatable(L, EXEC_MT);
  e->op.step = exec_step;
  e->s = s;
  e->loop = kg_loop_get(L);
  e->kind = kind;
  e->in_fd = e->out_fd = -1;
  e->timeout = timeout;
  e->deadline = timeout > 0 ? kg_now() + timeout : 0;
  return e;
}

/* session:exec(cmd, {stdin=, timeout=}) -> {code=, stdout=, stderr=} or nil, string, string */
static int s_exec(lua_State *L) {
  session_t *s = opensession(L);
  size_t len;
  const char *cmd = luaL_checkstring(L, 2);
  const char *in = NULL;
  exec_op *e;
  if (!lua_isnoneornil(L, 3)) luaL_checktype(L, 3, LUA_TTABLE);
  lua_settop(L, 3);
  e = new_exec(L, s, K_EXEC, opt_timeout(L, 3, "timeout", 0)); /* index 4 */
  e->cmd = strdup(cmd);
  if (lua_istable(L, 3) && lua_getfield(L, 3, "stdin") != LUA_TNIL) {
    in = luaL_checklstring(L, -1, &len);
    e->in = malloc(len ? len : 1);
    memcpy(e->in, in, len);
    e->inlen = len;
  }
  lua_settop(L, 4);
  return kg_drive(L, 4);
}

static const char *checkmode(lua_State *L, int opts, const char *def) {
  const char *mode = def, *p;
  if (lua_istable(L, opts) && lua_getfield(L, opts, "mode") != LUA_TNIL) {
    mode = luaL_checkstring(L, -1);
    lua_pop(L, 1);
  } else if (lua_istable(L, opts)) {
    lua_pop(L, 1);
  }
  for (p = mode; *p; p++)
    if (*p < '0' || *p > '7') luaL_error(L, "bad option 'mode' (octal digits expected, got '%s')", mode);
  if (p - mode < 3 || p - mode > 4) luaL_error(L, "bad option 'mode' (octal digits expected, got '%s')", mode);
  return mode;
}

/* command that stores stdin at path atomically: temp file beside it, then rename */
static void put_command(lua_State *L, const char *path, const char *mode) {
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  luaL_addstring(&b, "p=");
  addquoted(&b, path);
  luaL_addstring(&b, "; umask 077; t=$(mktemp \"$(dirname -- \"$p\")/.kengine-XXXXXX\") || exit 1; "
                     "if cat > \"$t\" && chmod ");
  luaL_addstring(&b, mode);
  luaL_addstring(&b, " \"$t\" && mv -f -- \"$t\" \"$p\"; then exit 0; fi; rm -f -- \"$t\"; exit 1");
  luaL_pushresult(&b);
}

/* session:put(remote_path, content, {mode="0644", timeout=}) -> true or nil, string, string */
static int s_put(lua_State *L) {
  session_t *s = opensession(L);
  const char *path = luaL_checkstring(L, 2);
  size_t len;
  const char *content = luaL_checklstring(L, 3, &len);
  const char *mode;
  exec_op *e;
  lua_settop(L, 4);
  mode = checkmode(L, 4, "0644");
  put_command(L, path, mode); /* 5 */
  e = new_exec(L, s, K_PUT, opt_timeout(L, 4, "timeout", 0)); /* 6 */
  e->cmd = strdup(lua_tostring(L, 5));
  e->in = malloc(len ? len : 1);
  memcpy(e->in, content, len);
  e->inlen = len;
  return kg_drive(L, 6);
}

/* session:get(remote_path) -> content or nil, string, string */
static int s_get(lua_State *L) {
  session_t *s = opensession(L);
  const char *path = luaL_checkstring(L, 2);
  luaL_Buffer b;
  exec_op *e;
  lua_settop(L, 3);
  luaL_buffinit(L, &b);
  luaL_addstring(&b, "cat -- ");
  addquoted(&b, path);
  luaL_pushresult(&b); /* 4 */
  e = new_exec(L, s, K_GET, opt_timeout(L, 3, "timeout", 0)); /* 5 */
  e->cmd = strdup(lua_tostring(L, 4));
  return kg_drive(L, 5);
}

/* session:upload(local_path, remote_path, {mode=}) -> true or nil, string, string */
static int s_upload(lua_State *L) {
  session_t *s = opensession(L);
  const char *local = luaL_checkstring(L, 2);
  const char *path = luaL_checkstring(L, 3);
  const char *mode;
  exec_op *e;
  int fd;
  lua_settop(L, 4);
  mode = checkmode(L, 4, "0644");
  fd = open(local, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return kg_fail(L, errno == ENOENT ? "ENOENT" : "EACCES", "%s: %s", local, strerror(errno));
  put_command(L, path, mode); /* 5 */
  e = new_exec(L, s, K_PUT, opt_timeout(L, 4, "timeout", 0)); /* 6 */
  e->cmd = strdup(lua_tostring(L, 5));
  e->in_fd = fd;
  e->inbuf = malloc(CHUNK);
  if (e->inbuf == NULL) return luaL_error(L, "out of memory");
  return kg_drive(L, 6);
}

/* session:download(remote_path, local_path) -> true or nil, string, string */
static int s_download(lua_State *L) {
  session_t *s = opensession(L);
  const char *path = luaL_checkstring(L, 2);
  const char *local = luaL_checkstring(L, 3);
  luaL_Buffer b;
  exec_op *e;
  char *tmp;
  int fd;
  lua_settop(L, 4);
  tmp = malloc(strlen(local) + 16);
  sprintf(tmp, "%s.kgXXXXXX", local);
  fd = mkostemp(tmp, O_CLOEXEC);
  if (fd < 0) {
    free(tmp);
    return kg_fail(L, errno == ENOENT ? "ENOENT" : "EACCES", "%s: %s", local, strerror(errno));
  }
  luaL_buffinit(L, &b);
  luaL_addstring(&b, "cat -- ");
  addquoted(&b, path);
  luaL_pushresult(&b); /* 5 */
  e = new_exec(L, s, K_DOWNLOAD, opt_timeout(L, 4, "timeout", 0)); /* 6 */
  e->cmd = strdup(lua_tostring(L, 5));
  e->out_fd = fd;
  e->local_tmp = tmp;
  e->local_path = strdup(local);
  return kg_drive(L, 6);
}

static const luaL_Reg session_methods[] = {
  {"exec", s_exec},
  {"put", s_put},
  {"get", s_get},
  {"upload", s_upload},
  {"download", s_download},
  {"close", s_close},
  {"target", s_target},
  {"is_open", s_isopen},
  {NULL, NULL}
};

static const luaL_Reg funcs[] = {
  {"connect", l_connect},
  {NULL, NULL}
};

int luaopen_kengine_ssh(lua_State *L) {
  kg_loop_get(L);
  ssh_init();
  if (luaL_newmetatable(L, SESSION_MT)) {
    luaL_newlib(L, session_methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, s_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, s_gc);
    lua_setfield(L, -2, "__close");
    lua_pushcfunction(L, s_tostring);
    lua_setfield(L, -2, "__tostring");
  }
  lua_pop(L, 1);
  if (luaL_newmetatable(L, CONNECT_MT)) {
    lua_pushcfunction(L, connect_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
  if (luaL_newmetatable(L, EXEC_MT)) {
    lua_pushcfunction(L, exec_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
  luaL_newlib(L, funcs);
  lua_pushstring(L, ssh_version(0));
  lua_setfield(L, -2, "libssh_version");
  return 1;
}
