/*
 * floor.c - the libssh floor for kengine's benchmark (bench/run.sh).
 *
 * A minimal blocking libssh client: connect + authenticate with one key
 * file (TCP_NODELAY set, host key checked strictly against a known_hosts
 * file), then run a short command M times, one channel after another, on
 * that one session.  With -n N it does the same for N sessions at once, one
 * POSIX thread per session (blocking libssh, one session per thread).
 *
 *   floor -H 127.0.0.1 -p PORT -u USER -i KEY -k KNOWN_HOSTS [-n N] [-m M] [-c CMD]
 *
 * Prints the timings of every operation as a summary (ms) and, last, one
 * machine-readable line:
 *   RESULT tool=floor n=N m=M wall_s=... connect_mean_ms=... connect_median_ms=...
 *          exec_mean_ms=... exec_median_ms=... exec_first_ms=... exec_rest_mean_ms=...
 *          commands=... errors=...
 *
 * Build: cc -O2 bench/floor.c -o bench/out/floor $(pkg-config --cflags --libs libssh)
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <libssh/libssh.h>

#define MAX_N 1000
#define MAX_M 100000

static const char *host = "127.0.0.1", *user, *key_path, *known_hosts, *cmd = "true";
static unsigned int port = 22;
static int n_sessions = 1, m_cmds = 1;

typedef struct {
  int id;
  double connect_ms;
  double *exec_ms; /* m_cmds entries */
  int done;        /* commands that completed with exit status 0 */
  char err[256];
} worker_t;

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* one command on a new channel; returns its exit status or -1 */
static int run_one(ssh_session s, char *err, size_t errlen) {
  char buf[4096];
  int n, status;
  ssh_channel ch = ssh_channel_new(s);
  if (ch == NULL) { snprintf(err, errlen, "channel_new: %s", ssh_get_error(s)); return -1; }
  if (ssh_channel_open_session(ch) != SSH_OK) {
    snprintf(err, errlen, "open_session: %s", ssh_get_error(s));
    ssh_channel_free(ch);
    return -1;
  }
  if (ssh_channel_request_exec(ch, cmd) != SSH_OK) {
    snprintf(err, errlen, "request_exec: %s", ssh_get_error(s));
    ssh_channel_close(ch);
    ssh_channel_free(ch);
    return -1;
  }
  /* drain stdout and stderr until EOF */
  while ((n = ssh_channel_read(ch, buf, sizeof buf, 0)) > 0) {}
  while ((n = ssh_channel_read(ch, buf, sizeof buf, 1)) > 0) {}
  ssh_channel_send_eof(ch);
  status = ssh_channel_get_exit_status(ch);
  ssh_channel_close(ch);
  ssh_channel_free(ch);
  return status;
}

static void *worker(void *arg) {
  worker_t *w = arg;
  ssh_session s;
  ssh_key key = NULL;
  long nodelay = 1, timeout = 30; /* seconds; kengine_bench.lua uses the same */
  int verbosity = SSH_LOG_NOLOG, i;
  double t0 = now_ms();

  s = ssh_new();
  if (s == NULL) { snprintf(w->err, sizeof w->err, "ssh_new failed"); return NULL; }
  ssh_options_set(s, SSH_OPTIONS_LOG_VERBOSITY, &verbosity);
  ssh_options_set(s, SSH_OPTIONS_HOST, host);
  ssh_options_set(s, SSH_OPTIONS_PORT, &port);
  ssh_options_set(s, SSH_OPTIONS_USER, user);
  ssh_options_set(s, SSH_OPTIONS_KNOWNHOSTS, known_hosts);
  ssh_options_set(s, SSH_OPTIONS_NODELAY, &nodelay);
  ssh_options_set(s, SSH_OPTIONS_TIMEOUT, &timeout);
  {
    int no = 0; /* no ~/.ssh/config: measure exactly what is asked */
    ssh_options_set(s, SSH_OPTIONS_PROCESS_CONFIG, &no);
  }
  if (ssh_connect(s) != SSH_OK) {
    snprintf(w->err, sizeof w->err, "connect: %s", ssh_get_error(s));
    goto out;
  }
  if (ssh_session_is_known_server(s) != SSH_KNOWN_HOSTS_OK) {
    snprintf(w->err, sizeof w->err, "host key not verified against %s", known_hosts);
    goto out;
  }
  if (ssh_pki_import_privkey_file(key_path, NULL, NULL, NULL, &key) != SSH_OK) {
    snprintf(w->err, sizeof w->err, "cannot load %s", key_path);
    goto out;
  }
  if (ssh_userauth_publickey(s, NULL, key) != SSH_AUTH_SUCCESS) {
    snprintf(w->err, sizeof w->err, "auth: %s", ssh_get_error(s));
    goto out;
  }
  w->connect_ms = now_ms() - t0;

  for (i = 0; i < m_cmds; i++) {
    double t = now_ms();
    int rc = run_one(s, w->err, sizeof w->err);
    w->exec_ms[i] = now_ms() - t;
    if (rc != 0) {
      if (!w->err[0]) snprintf(w->err, sizeof w->err, "'%s' exited with %d", cmd, rc);
      break;
    }
    w->done++;
  }
out:
  ssh_key_free(key);
  ssh_disconnect(s);
  ssh_free(s);
  return NULL;
}

static int cmp(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

static void stats(double *v, int n, double *mean, double *median) {
  double sum = 0;
  int i;
  *mean = *median = 0;
  if (n == 0) return;
  for (i = 0; i < n; i++) sum += v[i];
  qsort(v, (size_t)n, sizeof *v, cmp);
  *mean = sum / n;
  *median = n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

static void usage(void) {
  fprintf(stderr, "usage: floor -H HOST -p PORT -u USER -i KEY -k KNOWN_HOSTS [-n N] [-m M] [-c CMD]\n");
  exit(2);
}

int main(int argc, char **argv) {
  int opt, i, j, errors = 0, nexec = 0, nconn = 0, nrest = 0;
  worker_t *ws;
  pthread_t *th;
  double *conn, *execs, first_sum = 0, rest_sum = 0, nfirst = 0, t0, wall, cm, cmed, em, emed;

  while ((opt = getopt(argc, argv, "H:p:u:i:k:n:m:c:")) != -1) {
    switch (opt) {
    case 'H': host = optarg; break;
    case 'p': port = (unsigned)atoi(optarg); break;
    case 'u': user = optarg; break;
    case 'i': key_path = optarg; break;
    case 'k': known_hosts = optarg; break;
    case 'n': n_sessions = atoi(optarg); break;
    case 'm': m_cmds = atoi(optarg); break;
    case 'c': cmd = optarg; break;
    default: usage();
    }
  }
  if (!user || !key_path || !known_hosts) usage();
  if (n_sessions < 1 || n_sessions > MAX_N || m_cmds < 1 || m_cmds > MAX_M) {
    fprintf(stderr, "floor: need 1 <= N <= %d and 1 <= M <= %d\n", MAX_N, MAX_M);
    return 2;
  }

  ssh_init();
  ws = calloc((size_t)n_sessions, sizeof *ws);
  th = calloc((size_t)n_sessions, sizeof *th);
  conn = calloc((size_t)n_sessions, sizeof *conn);
  execs = calloc((size_t)n_sessions * (size_t)m_cmds, sizeof *execs);
  if (!ws || !th || !conn || !execs) { perror("calloc"); return 1; }

  t0 = now_ms();
  for (i = 0; i < n_sessions; i++) {
    ws[i].id = i;
    ws[i].exec_ms = calloc((size_t)m_cmds, sizeof(double));
    if (!ws[i].exec_ms) { perror("calloc"); return 1; }
    if (n_sessions == 1) { worker(&ws[i]); break; } /* no thread at all for one session */
    if (pthread_create(&th[i], NULL, worker, &ws[i]) != 0) { perror("pthread_create"); return 1; }
  }
  if (n_sessions > 1)
    for (i = 0; i < n_sessions; i++) pthread_join(th[i], NULL);
  wall = now_ms() - t0;

  for (i = 0; i < n_sessions; i++) {
    if (ws[i].err[0]) {
      errors++;
      if (errors <= 5) fprintf(stderr, "floor: session %d: %s\n", i, ws[i].err);
    }
    if (ws[i].connect_ms > 0) conn[nconn++] = ws[i].connect_ms;
    if (ws[i].done > 0) { first_sum += ws[i].exec_ms[0]; nfirst++; }
    for (j = 0; j < ws[i].done; j++) {
      execs[nexec++] = ws[i].exec_ms[j];
      if (j > 0) { rest_sum += ws[i].exec_ms[j]; nrest++; }
    }
  }
  stats(conn, nconn, &cm, &cmed);
  stats(execs, nexec, &em, &emed);
  printf("floor: libssh %s, %d session(s) x %d x '%s'\n", ssh_version(0), n_sessions, m_cmds, cmd);
  printf("  connect+auth ms: mean %.2f median %.2f (%d sessions)\n", cm, cmed, nconn);
  printf("  exec ms:         mean %.2f median %.2f (%d commands); first %.2f, rest mean %.2f\n", em, emed,
         nexec, nfirst ? first_sum / nfirst : 0.0, nrest ? rest_sum / nrest : 0.0);
  printf("  wall s:          %.3f, errors %d\n", wall / 1e3, errors);
  printf("RESULT tool=floor n=%d m=%d wall_s=%.4f connect_mean_ms=%.3f connect_median_ms=%.3f "
         "exec_mean_ms=%.3f exec_median_ms=%.3f exec_first_ms=%.3f exec_rest_mean_ms=%.3f commands=%d errors=%d\n",
         n_sessions, m_cmds, wall / 1e3, cm, cmed, em, emed,
         nfirst ? first_sum / nfirst : 0.0, nrest ? rest_sum / nrest : 0.0, nexec, errors);
  for (i = 0; i < n_sessions; i++) free(ws[i].exec_ms);
  free(ws); free(th); free(conn); free(execs);
  ssh_finalize();
  return errors ? 1 : 0;
}
