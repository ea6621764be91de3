/*
 * loop.c - the scheduler behind every waiting primitive (see loop.h).
 *
 * Tasks are coroutines created by core.spawn().  A task that waits is linked
 * nowhere but through its operation's waiter; the loop keeps one list of
 * armed waiters, polls their descriptors and the curl multi handle's sockets
 * in one poll() call, fires waiters whose descriptor is ready or whose
 * deadline passed, and resumes their tasks.  Nothing here knows about SSH or
 * HTTP beyond the curl multi handle it owns.
 */
#define _GNU_SOURCE
#include "loop.h"

#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define LOOP_KEY "kengine.loop"
#define TASK_MT "kengine.task"
#define ALIVE_KEY "kengine.tasks"

enum { T_READY, T_WAITING, T_RUNNING, T_DONE, T_FAILED };

struct kg_task {
  lua_State *co;
  int state;
  int nargs;       /* arguments waiting on co's stack for the first resume */
  int nres;        /* results on co's stack once done */
  int observed;    /* someone asked for the results */
  kg_waitq joiners;
  kg_task *rnext;  /* ready queue link */
  int queued;
};

typedef struct {
  curl_socket_t fd;
  int what; /* CURL_POLL_* */
} curl_sock;

struct kg_loop {
  kg_waiter *armed;                 /* every armed waiter */
  kg_task *rhead, *rtail;           /* ready tasks */
  kg_task *current;                 /* task being resumed, if any */
  int alive;                        /* tasks not finished */
  CURLM *multi;
  curl_sock *socks;
  int nsocks, capsocks;
  double curl_deadline;             /* 0 = no curl timer */
  int ncurl;                        /* easy handles in the multi */
  struct pollfd *pfds;
  kg_waiter **pw;                   /* waiter (or NULL for curl) per pollfd */
  int cappfds;
};

double kg_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int kg_fail(lua_State *L, const char *code, const char *fmt, ...) {
  va_list ap;
  luaL_pushfail(L);
  lua_pushfstring(L, "%s: ", code);
  va_start(ap, fmt);
  lua_pushvfstring(L, fmt, ap);
  va_end(ap);
  lua_concat(L, 2);
  lua_pushstring(L, code);
  return 3;
}

/* ---- curl multi glue ------------------------------------------------- */

static int curl_socket_cb(CURL *e, curl_socket_t s, int what, void *userp, void *sockp) {
  kg_loop *loop = userp;
  int i;
  (void)e; (void)sockp;
  for (i = 0; i < loop->nsocks; i++)
    if (loop->socks[i].fd == s) break;
  if (what == CURL_POLL_REMOVE) {
    if (i < loop->nsocks) loop->socks[i] = loop->socks[--loop->nsocks];
    return 0;
  }
  if (i == loop->nsocks) {
    if (loop->nsocks == loop->capsocks) {
      int cap = loop->capsocks ? loop->capsocks * 2 : 8;
      curl_sock *n = realloc(loop->socks, (size_t)cap * sizeof *n);
      if (n == NULL) return -1;
      loop->socks = n;
      loop->capsocks = cap;
    }
    loop->nsocks++;
  }
  loop->socks[i].fd = s;
  loop->socks[i].what = what;
  return 0;
}

static int curl_timer_cb(CURLM *m, long timeout_ms, void *userp) {
  kg_loop *loop = userp;
  (void)m;
  loop->curl_deadline = timeout_ms < 0 ? 0 : kg_now() + (double)timeout_ms / 1000.0;
  return 0;
}

static CURLM *curl_multi(kg_loop *loop) {
  if (loop->multi == NULL) {
    curl_global_init(CURL_GLOBAL_DEFAULT);
    loop->multi = curl_multi_init();
    if (loop->multi == NULL) return NULL;
    curl_multi_setopt(loop->multi, CURLMOPT_SOCKETFUNCTION, curl_socket_cb);
    curl_multi_setopt(loop->multi, CURLMOPT_SOCKETDATA, loop);
    curl_multi_setopt(loop->multi, CURLMOPT_TIMERFUNCTION, curl_timer_cb);
    curl_multi_setopt(loop->multi, CURLMOPT_TIMERDATA, loop);
  }
  return loop->multi;
}

CURLMcode kg_curl_add(kg_loop *loop, CURL *easy) {
  CURLMcode rc;
  if (curl_multi(loop) == NULL) return CURLM_OUT_OF_MEMORY;
  rc = curl_multi_add_handle(loop->multi, easy);
  if (rc == CURLM_OK) loop->ncurl++;
  return rc;
}

void kg_curl_remove(kg_loop *loop, CURL *easy) {
  if (loop->multi && curl_multi_remove_handle(loop->multi, easy) == CURLM_OK) loop->ncurl--;
}

static void curl_drain(kg_loop *loop) {
  CURLMsg *msg;
  int left;
  while ((msg = curl_multi_info_read(loop->multi, &left)) != NULL) {
    kg_op *op = NULL;
    if (msg->msg != CURLMSG_DONE) continue;
    curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&op);
    if (op == NULL) continue;
    op->done = 1;
    op->result = (int)msg->data.result;
    if (op->w.armed) kg_wake(loop, &op->w);
  }
}

static void curl_action(kg_loop *loop, curl_socket_t fd, int ev) {
  int running;
  curl_multi_socket_action(loop->multi, fd, ev, &running);
  curl_drain(loop);
}

/* ---- waiters ----------------------------------------------------------- */

static void queue_remove(kg_waiter *w) {
  kg_waiter **p;
  if (w->qhead == NULL) return;
  for (p = w->qhead; *p != NULL; p = &(*p)->qnext)
    if (*p == w) { *p = w->qnext; break; }
  w->qnext = NULL;
}

void kg_unwait(kg_loop *loop, kg_waiter *w) {
  if (!w->armed) return;
  if (w->prev) w->prev->next = w->next;
  else loop->armed = w->next;
  if (w->next) w->next->prev = w->prev;
  w->prev = w->next = NULL;
  queue_remove(w);
  w->armed = 0;
}

static void push_ready(kg_loop *loop, kg_task *t) {
  if (t->queued) return;
  t->queued = 1;
  t->state = T_READY;
  t->rnext = NULL;
  if (loop->rtail) loop->rtail->rnext = t;
  else loop->rhead = t;
  loop->rtail = t;
}

void kg_wake(kg_loop *loop, kg_waiter *w) {
  kg_unwait(loop, w);
  w->fired = 1;
  if (w->task) push_ready(loop, w->task);
}

static void arm(kg_loop *loop, kg_waiter *w, kg_task *t) {
  w->task = t;
  w->fired = w->timed_out = 0;
  w->revents = 0;
  w->prev = NULL;
  w->next = loop->armed;
  if (loop->armed) loop->armed->prev = w;
  loop->armed = w;
  w->armed = 1;
  if (w->qhead) { /* append: wake in arrival order */
    kg_waiter **p = w->qhead;
    while (*p) p = &(*p)->qnext;
    *p = w;
    w->qnext = NULL;
  }
  if (t) t->state = T_WAITING;
}

void kg_want(kg_op *op, int fd, short events, double deadline) {
  int i;
  for (i = 0; i < KG_MAXFD; i++) op->w.fd[i] = -1;
  op->w.fd[0] = fd;
  op->w.events[0] = events;
  op->w.deadline = deadline;
  op->w.qhead = NULL;
  op->w.ready = NULL;
}

void kg_want_fd(kg_op *op, int fd, short events) {
  int i;
  if (fd < 0) return;
  for (i = 0; i < KG_MAXFD; i++)
    if (op->w.fd[i] < 0) {
      op->w.fd[i] = fd;
      op->w.events[i] = events;
      return;
    }
}

void kg_want_queue(kg_op *op, kg_waitq *q, double deadline) {
  kg_want(op, -1, 0, deadline);
  op->w.qhead = &q->head;
}

void kg_waitq_wake_one(kg_loop *loop, kg_waitq *q) {
  if (q->head) kg_wake(loop, q->head);
}

void kg_waitq_wake_all(kg_loop *loop, kg_waitq *q) {
  while (q->head) kg_wake(loop, q->head);
}

/* ---- the loop ---------------------------------------------------------- */

static int loop_gc(lua_State *L) {
  kg_loop *loop = lua_touserdata(L, 1);
  /* Easy handles still in the multi belong to operations that may be
   * finalised after us; leaking the multi at exit beats a use after free. */
  if (loop->multi && loop->ncurl == 0) curl_multi_cleanup(loop->multi);
  loop->multi = NULL;
  free(loop->socks);
  free(loop->pfds);
  free(loop->pw);
  loop->socks = NULL; loop->pfds = NULL; loop->pw = NULL;
  return 0;
}

kg_loop *kg_loop_get(lua_State *L) {
  kg_loop *loop;
  if (lua_getfield(L, LUA_REGISTRYINDEX, LOOP_KEY) == LUA_TUSERDATA) {
    loop = lua_touserdata(L, -1);
    lua_pop(L, 1);
    return loop;
  }
  lua_pop(L, 1);
  loop = lua_newuserdatauv(L, sizeof *loop, 0);
  memset(loop, 0, sizeof *loop);
  lua_createtable(L, 0, 1);
  lua_pushcfunction(L, loop_gc);
  lua_setfield(L, -2, "__gc");
  lua_setmetatable(L, -2);
  lua_setfield(L, LUA_REGISTRYINDEX, LOOP_KEY);
  lua_newtable(L); /* tasks alive: anchored until they finish */
  lua_setfield(L, LUA_REGISTRYINDEX, ALIVE_KEY);
  return loop;
}

static void task_finished(lua_State *L, kg_loop *loop, kg_task *t, int status, int nres) {
  if (status == LUA_OK) {
    t->state = T_DONE;
    t->nres = nres;
  } else {
    /* keep the error value and a traceback of the dead coroutine */
    const char *msg = lua_tostring(t->co, -1);
    luaL_traceback(t->co, t->co, msg ? msg : "(error object is not a string)", 0);
    t->state = T_FAILED;
  }
  loop->alive--;
  kg_waitq_wake_all(loop, &t->joiners);
  /* drop the anchor */
  lua_getfield(L, LUA_REGISTRYINDEX, ALIVE_KEY);
  lua_pushlightuserdata(L, t);
  lua_pushnil(L);
  lua_rawset(L, -3);
  lua_pop(L, 1);
}

static void resume_task(lua_State *L, kg_loop *loop, kg_task *t) {
  kg_task *saved = loop->current;
  int nres = 0, status, nargs = t->nargs;
  t->nargs = 0;
  t->state = T_RUNNING;
  loop->current = t;
  status = lua_resume(t->co, L, nargs, &nres);
  loop->current = saved;
  if (status == LUA_YIELD) {
    lua_pop(t->co, nres);
    /* a plain coroutine.yield() inside a task: run it again next round */
    if (t->state == T_RUNNING) push_ready(loop, t);
  } else {
    task_finished(L, loop, t, status, nres);
  }
}

static int grow_pfds(kg_loop *loop, int need) {
  if (need > loop->cappfds) {
    int cap = need * 2;
    struct pollfd *p = realloc(loop->pfds, (size_t)cap * sizeof *p);
    kg_waiter **w;
    if (p == NULL) return 0;
    loop->pfds = p;
    w = realloc(loop->pw, (size_t)cap * sizeof *w);
    if (w == NULL) return 0;
    loop->pw = w;
    loop->cappfds = cap;
  }
  return 1;
}

/*
 * One round: resume ready tasks, then poll for what the armed waiters wait
 * for.  block = 0 polls without waiting.  Returns 0 when there is nothing at
 * all that could ever make progress (a deadlock for an inline waiter).
 */
static int loop_step(lua_State *L, kg_loop *loop, int block) {
  kg_waiter *w, *next;
  double now, until = 0;
  int n = 0, i, timeout, rc, fired = 0;

  while (loop->rhead) {
    kg_task *t = loop->rhead;
    loop->rhead = t->rnext;
    if (loop->rhead == NULL) loop->rtail = NULL;
    t->queued = 0;
    resume_task(L, loop, t);
    fired++; /* progress: an inline waiter may have been woken by it */
  }

  /* ready checks, descriptors, deadlines */
  for (w = loop->armed; w; w = next) {
    next = w->next;
    if (w->ready && w->ready(w)) { kg_wake(loop, w); fired++; }
  }
  for (w = loop->armed; w; w = w->next) {
    for (i = 0; i < KG_MAXFD; i++) n += w->fd[i] >= 0;
    if (w->deadline > 0 && (until == 0 || w->deadline < until)) until = w->deadline;
  }
  if (loop->multi) {
    n += loop->nsocks;
    if (loop->curl_deadline > 0 && (until == 0 || loop->curl_deadline < until))
      until = loop->curl_deadline;
  }
  if (n == 0 && until == 0 && loop->rhead == NULL && fired == 0) return 0;
  if (!grow_pfds(loop, n + 1)) luaL_error(L, "out of memory in the event loop");

  n = 0;
  for (w = loop->armed; w; w = w->next) {
    for (i = 0; i < KG_MAXFD; i++) {
      if (w->fd[i] < 0) continue;
      loop->pfds[n].fd = w->fd[i];
      loop->pfds[n].events = w->events[i];
      loop->pfds[n].revents = 0;
      loop->pw[n++] = w;
    }
  }
  if (loop->multi) {
    for (i = 0; i < loop->nsocks; i++) {
      int what = loop->socks[i].what;
      loop->pfds[n].fd = loop->socks[i].fd;
      loop->pfds[n].events = (short)(((what & CURL_POLL_IN) ? POLLIN : 0) |
                                     ((what & CURL_POLL_OUT) ? POLLOUT : 0));
      loop->pfds[n].revents = 0;
      loop->pw[n++] = NULL;
    }
  }

  if (!block || fired || loop->rhead) timeout = 0;
  else if (until == 0) timeout = -1;
  else {
    double d = (until - kg_now()) * 1000.0;
    timeout = d <= 0 ? 0 : (int)(d + 0.999);
  }
  rc = poll(loop->pfds, (nfds_t)n, timeout);
  if (rc < 0 && errno != EINTR) luaL_error(L, "poll failed: %s", strerror(errno));

  /* descriptor events: waiters first, then curl (which may wake waiters) */
  for (i = 0; rc > 0 && i < n; i++) {
    if (loop->pfds[i].revents == 0) continue;
    if (loop->pw[i] != NULL) {
      w = loop->pw[i];
      if (w->armed) {
        w->revents = loop->pfds[i].revents;
        kg_wake(loop, w);
      }
    } else if (loop->multi) {
      short re = loop->pfds[i].revents;
      int ev = ((re & POLLIN) ? CURL_CSELECT_IN : 0) | ((re & POLLOUT) ? CURL_CSELECT_OUT : 0) |
               ((re & (POLLERR | POLLHUP)) ? CURL_CSELECT_ERR : 0);
      curl_action(loop, loop->pfds[i].fd, ev);
    }
  }
  now = kg_now();
  if (loop->multi && loop->curl_deadline > 0 && loop->curl_deadline <= now) {
    loop->curl_deadline = 0;
    curl_action(loop, CURL_SOCKET_TIMEOUT, 0);
  }
  for (w = loop->armed; w; w = next) {
    next = w->next;
    if (w->deadline > 0 && w->deadline <= now) {
      w->timed_out = 1;
      kg_wake(loop, w);
    }
  }
  return 1;
}

/* Wait for op without a task to yield: run the loop here until it fires. */
static void wait_inline(lua_State *L, kg_loop *loop, kg_op *op) {
  arm(loop, &op->w, NULL);
  while (!op->w.fired) {
    if (!loop_step(L, loop, 1)) {
      kg_unwait(loop, &op->w);
      luaL_error(L, "deadlock: waiting for an event that nothing can produce");
    }
  }
}

static int drive_k(lua_State *L, int status, lua_KContext ctx) {
  int idx = (int)ctx;
  kg_op *op = lua_touserdata(L, idx);
  kg_loop *loop = kg_loop_get(L);
  (void)status;
  for (;;) {
    int n = op->step(L, op);
    if (n != KG_AGAIN) {
      kg_unwait(loop, &op->w);
      return n;
    }
    if (loop->current && loop->current->co == L && lua_isyieldable(L)) {
      arm(loop, &op->w, loop->current);
      return lua_yieldk(L, 0, ctx, drive_k);
    }
    wait_inline(L, loop, op);
  }
}

int kg_drive(lua_State *L, int idx) {
  idx = lua_absindex(L, idx);
  return drive_k(L, LUA_OK, (lua_KContext)idx);
}

/* ---- Lua API: tasks ------------------------------------------------------ */

#define checktask(L) ((kg_task *)luaL_checkudata(L, 1, TASK_MT))

static int core_spawn(lua_State *L) {
  kg_loop *loop = kg_loop_get(L);
  int nargs = lua_gettop(L) - 1;
  kg_task *t;
  luaL_checktype(L, 1, LUA_TFUNCTION);
  t = lua_newuserdatauv(L, sizeof *t, 1);
  memset(t, 0, sizeof *t);
  luaL_setmetatable(L, TASK_MT);
  t->co = lua_newthread(L);
  lua_setiuservalue(L, -2, 1); /* the task keeps its coroutine */
  lua_rotate(L, 1, 1);         /* task, fn, args... */
  lua_xmove(L, t->co, nargs + 1);
  t->nargs = nargs;
  lua_getfield(L, LUA_REGISTRYINDEX, ALIVE_KEY);
  lua_pushlightuserdata(L, t);
  lua_pushvalue(L, 1);
  lua_rawset(L, -3);
  lua_pop(L, 1);
  loop->alive++;
  push_ready(loop, t);
  return 1;
}

typedef struct {
  kg_op op;
  kg_task *t;
} join_op;

static int push_results(lua_State *L, kg_task *t) {
  int i, base;
  t->observed = 1;
  if (t->state == T_FAILED) {
    luaL_pushfail(L);
    lua_pushvalue(t->co, -2); /* the error value, below the traceback */
    lua_xmove(t->co, L, 1);
    return 2;
  }
  luaL_checkstack(L, t->nres + 1, "too many results");
  base = lua_gettop(t->co) - t->nres;
  for (i = 1; i <= t->nres; i++) lua_pushvalue(t->co, base + i);
  lua_xmove(t->co, L, t->nres);
  return t->nres;
}

static int join_step(lua_State *L, kg_op *op) {
  join_op *j = (join_op *)op;
  if (j->t->state == T_DONE || j->t->state == T_FAILED) return push_results(L, j->t);
  kg_want_queue(op, &j->t->joiners, 0);
  return KG_AGAIN;
}

/* task:wait() -> the function's results, or nil, err if it raised */
static int task_wait(lua_State *L) {
  kg_task *t = checktask(L);
  join_op *j;
  kg_loop *loop = kg_loop_get(L);
  if (loop->current == t) return luaL_error(L, "a task cannot wait for itself");
  lua_settop(L, 1);
  j = lua_newuserdatauv(L, sizeof *j, 0);
  memset(j, 0, sizeof *j);
  j->op.step = join_step;
  j->t = t;
  return kg_drive(L, 2);
}

static int task_status(lua_State *L) {
  static const char *const names[] = {"ready", "waiting", "running", "done", "failed"};
  kg_task *t = checktask(L);
  lua_pushstring(L, names[t->state]);
  return 1;
}

/* task:traceback() -> the failed task's traceback, or nil */
static int task_traceback(lua_State *L) {
  kg_task *t = checktask(L);
  if (t->state != T_FAILED) return 0;
  lua_pushvalue(t->co, -1);
  lua_xmove(t->co, L, 1);
  return 1;
}

static int task_tostring(lua_State *L) {
  kg_task *t = checktask(L);
  lua_pushfstring(L, "kengine.task (%p)", (void *)t);
  return 1;
}

static int task_gc(lua_State *L) {
  kg_task *t = lua_touserdata(L, 1);
  /* An error nobody looked at must not vanish. */
  if (t->state == T_FAILED && !t->observed) {
    const char *tb = lua_tostring(t->co, -1);
    fprintf(stderr, "kengine: unobserved task error: %s\n", tb ? tb : "?");
  }
  return 0;
}

/* ---- Lua API: time -------------------------------------------------------- */

typedef struct {
  kg_op op;
  double until;
  int started;
} sleep_op;

static int sleep_step(lua_State *L, kg_op *op) {
  sleep_op *s = (sleep_op *)op;
  (void)L;
  if (s->started && (op->w.timed_out || kg_now() >= s->until)) return 0;
  s->started = 1;
  kg_want(op, -1, 0, s->until);
  return KG_AGAIN;
}

static int core_sleep(lua_State *L) {
  double secs = luaL_checknumber(L, 1);
  sleep_op *s;
  lua_settop(L, 1);
  s = lua_newuserdatauv(L, sizeof *s, 0);
  memset(s, 0, sizeof *s);
  s->op.step = sleep_step;
  s->until = kg_now() + (secs > 0 ? secs : 0);
  if (s->until <= 0) s->until = 1e-9;
  return kg_drive(L, 2);
}

static int core_now(lua_State *L) {
  lua_pushnumber(L, kg_now());
  return 1;
}

static int core_time(lua_State *L) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  lua_pushnumber(L, (double)ts.tv_sec + (double)ts.tv_nsec / 1e9);
  return 1;
}

/* core.yield(): let other tasks run (a no-op outside a task but one poll) */
static int core_yield(lua_State *L) {
  kg_loop *loop = kg_loop_get(L);
  if (loop->current && loop->current->co == L && lua_isyieldable(L)) {
    return lua_yield(L, 0);
  }
  loop_step(L, loop, 0);
  return 0;
}

/* core.run(): drive the loop until every task has finished */
static int core_run(lua_State *L) {
  kg_loop *loop = kg_loop_get(L);
  while (loop->alive > 0) {
    if (!loop_step(L, loop, 1) && loop->rhead == NULL && loop->alive > 0)
      return luaL_error(L, "deadlock: %d task(s) wait for events that nothing can produce", loop->alive);
  }
  return 0;
}

/* core.current() -> the running task or nil */
static int core_current(lua_State *L) {
  kg_loop *loop = kg_loop_get(L);
  if (loop->current == NULL) return 0;
  lua_getfield(L, LUA_REGISTRYINDEX, ALIVE_KEY);
  lua_pushlightuserdata(L, loop->current);
  lua_rawget(L, -2);
  return 1;
}

static const luaL_Reg task_methods[] = {
  {"wait", task_wait},
  {"status", task_status},
  {"traceback", task_traceback},
  {NULL, NULL}
};

static const luaL_Reg core_funcs[] = {
  {"spawn", core_spawn},
  {"sleep", core_sleep},
  {"now", core_now},
  {"time", core_time},
  {"yield", core_yield},
  {"run", core_run},
  {"current", core_current},
  {NULL, NULL}
};

int luaopen_kengine_core(lua_State *L) {
  kg_loop_get(L);
  if (luaL_newmetatable(L, TASK_MT)) {
    luaL_newlib(L, task_methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, task_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, task_tostring);
    lua_setfield(L, -2, "__tostring");
  }
  lua_pop(L, 1);
  luaL_newlib(L, core_funcs);
  lua_pushliteral(L, LUA_RELEASE);
  lua_setfield(L, -2, "lua_version");
  return 1;
}
