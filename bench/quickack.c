/*
 * quickack.c - experiment for bench/run.sh: an LD_PRELOAD shim that sets
 * TCP_QUICKACK on every descriptor just before each poll().
 *
 * Why: sshd leaves Nagle on for sessions without a tty.  Right after auth it
 * sends an unsolicited global request (hostkeys-00@openssh.com, ~270 bytes);
 * the client has nothing to answer, so Linux delays its ACK (up to 40 ms), and
 * sshd's Nagle holds the small CHANNEL_OPEN_CONFIRMATION of the first command
 * until that ACK arrives.  The first exec on every fresh session then costs
 * ~45 ms instead of ~3 ms.  Quick ACKs before every wait remove the stall; the
 * row "+ TCP_QUICKACK" in the report measures what an engine fix (the same
 * setsockopt on the session socket before each wait) would gain.
 *
 * Build: cc -O2 -shared -fPIC bench/quickack.c -o bench/out/quickack.so -ldl
 * Use:   LD_PRELOAD=bench/out/quickack.so ./kengine run ...
 * setsockopt on a non-TCP descriptor fails with ENOTSOCK/EOPNOTSUPP, ignored.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stddef.h>
#include <sys/socket.h>

int poll(struct pollfd *fds, nfds_t n, int timeout) {
  static int (*real_poll)(struct pollfd *, nfds_t, int);
  int one = 1, saved = errno;
  nfds_t i;
  if (real_poll == NULL) real_poll = (int (*)(struct pollfd *, nfds_t, int))dlsym(RTLD_NEXT, "poll");
  for (i = 0; i < n; i++)
    if (fds[i].fd >= 0) setsockopt(fds[i].fd, IPPROTO_TCP, TCP_QUICKACK, &one, sizeof one);
  errno = saved;
  return real_poll(fds, n, timeout);
}
