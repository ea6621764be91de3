/*
 * loop.h - kengine's scheduler: one poll() loop, Lua coroutines as tasks.
 *
 * Every primitive that waits (SSH, HTTP, local processes, sleep, joining a
 * task) is written as an "operation": a userdata whose first member is a
 * kg_op.  Its step function does as much work as it can without blocking and
 * either finishes (pushes its results) or says what it waits for (a file
 * descriptor, a deadline, or an explicit wake-up).  kg_drive() then yields the
 * calling task to the loop, which resumes it when the wait is over.  Called
 * outside a task (the main thread, a plain coroutine, a non-yieldable C call)
 * the same operation drives the loop itself until it completes, so everything
 * also works from a stock lua5.4 interpreter.
 *
 * The loop's state lives in one userdata under one registry key, reached only
 * through kg_loop_get(); every C module that includes this file shares it.
 */
#ifndef KENGINE_LOOP_H
#define KENGINE_LOOP_H

#include <lua.h>
#include <lauxlib.h>
#include <curl/curl.h>

#define KG_AGAIN (-1) /* step result: wait as described in op->w, then call again */

typedef struct kg_loop kg_loop;
typedef struct kg_task kg_task;
typedef struct kg_waiter kg_waiter;
typedef struct kg_op kg_op;

/* One pending wait.  Lives inside an operation (or a task, for joins). */
#define KG_MAXFD 3
struct kg_waiter {
  int fd[KG_MAXFD];  /* -1: none; a local child waits on stdin, stdout, stderr */
  short events[KG_MAXFD]; /* POLLIN / POLLOUT */
  short revents;     /* filled in when woken by a descriptor */
  double deadline;   /* kg_now() based; 0 = none */
  int fired;         /* set when woken */
  int timed_out;     /* set when the deadline passed first */
  kg_task *task;     /* task to resume, or NULL for an inline wait */
  kg_waiter *prev, *next; /* in the loop's list while armed */
  kg_waiter **qhead;      /* when parked on a wait queue */
  kg_waiter *qnext;
  /* Optional check run before every poll(): data may already sit in a
   * library's buffer (libssh reads packets for every channel of a session
   * whoever asks), so a descriptor alone cannot tell. Non-zero: fire now. */
  int (*ready)(kg_waiter *w);
  void *ready_ud;
  int armed;
};

typedef int (*kg_stepfn)(lua_State *L, kg_op *op);

/* Header of every operation userdata. */
struct kg_op {
  kg_stepfn step;
  kg_waiter w;
  int done;    /* set by the loop for curl completions */
  int result;  /* the CURLcode of a completed transfer */
};

/* A wait queue: waiters woken explicitly (task joins, channel slots). */
typedef struct kg_waitq {
  kg_waiter *head;
} kg_waitq;

kg_loop *kg_loop_get(lua_State *L);
double kg_now(void);

/* Describe the next wait of op: fd may be -1, deadline 0 means none;
 * kg_want_fd adds another descriptor to the same wait.
 * kg_want_queue waits to be woken through q (plus the deadline). */
void kg_want(kg_op *op, int fd, short events, double deadline);
void kg_want_fd(kg_op *op, int fd, short events);
void kg_want_queue(kg_op *op, kg_waitq *q, double deadline);

/* Run op->step until it finishes; yields the current task while waiting.
 * The op userdata must be at stack index idx for the whole operation. */
int kg_drive(lua_State *L, int idx);

void kg_waitq_wake_one(kg_loop *loop, kg_waitq *q);
void kg_waitq_wake_all(kg_loop *loop, kg_waitq *q);

/* Fire a waiter now (e.g. from a curl completion). */
void kg_wake(kg_loop *loop, kg_waiter *w);
/* Disarm a waiter (operation finished or being collected). */
void kg_unwait(kg_loop *loop, kg_waiter *w);

/* Add an easy handle to the loop's curl multi handle.  CURLOPT_PRIVATE must
 * point to the kg_op; its completion sets op->done and op->result and wakes
 * op->w.  Remove it (done or not) before cleaning it up. */
CURLMcode kg_curl_add(kg_loop *loop, CURL *easy);
void kg_curl_remove(kg_loop *loop, CURL *easy);

/* Expected failures: push nil, "CODE: message", "CODE" and return 3. */
int kg_fail(lua_State *L, const char *code, const char *fmt, ...);

int luaopen_kengine_core(lua_State *L);

#endif
