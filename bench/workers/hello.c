/*
 * hello.c: the native HTTP worker of the benchmark: one process, one thread, one epoll loop.
 *
 * Where it listens:
 *   - LISTEN_FDS set (and LISTEN_PID, if set, is this process): the inherited socket on fd 3,
 *     as handed down by reuse-launch (or systemd);
 *   - otherwise its own socket on HOST:PORT (default 127.0.0.1:8080) with SO_REUSEPORT, so
 *     N copies started side by side form a bare kernel reuseport group, nothing in between.
 *
 * HTTP/1.1 with keep-alive; `Connection: close` (and HTTP/1.0 without keep-alive) closes after
 * the response. Routes: `/` answers "hello from pid N"; `/cpu` runs a busy loop of 1e7
 * iterations first; anything else is 404. Every response has an `X-Pid` header.
 * The listening socket is watched with EPOLLEXCLUSIVE, so workers sharing one socket do not
 * all wake for every connection, and each wake-up accepts one connection. Prints
 * `ready pid=N` on stderr once listening; SIGTERM or SIGINT make it exit 0.
 *
 * Build: gcc -O2 -Wall -Wextra -o hello-c hello.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define INHERITED_FD 3
#define BACKLOG 4096
#define MAX_EVENTS 256
#define IN_CAP 16384
#define CPU_ITERATIONS 10000000L

struct conn {
    int fd;
    size_t in_len;
    char in[IN_CAP];
    char *out;       /* bytes not yet written */
    size_t out_len;
    size_t out_cap;
    int close_after; /* close once `out` is flushed */
};

static volatile sig_atomic_t stopping = 0;
static char pid_text[16];

static void on_stop_signal(int sig) {
    (void)sig;
    stopping = 1;
}

static void die(const char *what) {
    fprintf(stderr, "hello.c pid=%s: %s: %s\n", pid_text, what, strerror(errno));
    exit(1);
}

/* ---------- listening socket ---------- */

static int inherited_listener(void) {
    const char *fds = getenv("LISTEN_FDS");
    const char *pid = getenv("LISTEN_PID");
    if (fds == NULL || atoi(fds) < 1) return -1;
    if (pid != NULL && strcmp(pid, pid_text) != 0) return -1;
    return INHERITED_FD;
}

static int own_listener(void) {
    const char *host = getenv("HOST") ? getenv("HOST") : "127.0.0.1";
    const char *port = getenv("PORT") ? getenv("PORT") : "8080";
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(port))};
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
        fprintf(stderr, "hello.c: HOST must be an IPv4 address, not '%s'\n", host);
        exit(2);
    }
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket");
    int one = 1;
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0) die("SO_REUSEADDR");
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) < 0) die("SO_REUSEPORT");
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0) die("bind");
    if (listen(fd, BACKLOG) < 0) die("listen");
    return fd;
}

static int open_listener(const char **where) {
    int fd = inherited_listener();
    *where = "fd 3";
    if (fd < 0) {
        fd = own_listener();
        *where = "own SO_REUSEPORT socket";
    }
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0) die("fcntl O_NONBLOCK");
    return fd;
}

/* ---------- connections ---------- */

static struct conn *conn_new(int fd) {
    struct conn *c = calloc(1, sizeof *c);
    if (c == NULL) die("calloc");
    c->fd = fd;
    return c;
}

static void conn_free(struct conn *c) {
    close(c->fd); /* also removes it from the epoll set */
    free(c->out);
    free(c);
}

static void out_append(struct conn *c, const char *data, size_t len) {
    if (c->out_len + len > c->out_cap) {
        size_t cap = c->out_cap ? c->out_cap : 4096;
        while (cap < c->out_len + len) cap *= 2;
        c->out = realloc(c->out, cap);
        if (c->out == NULL) die("realloc");
        c->out_cap = cap;
    }
    memcpy(c->out + c->out_len, data, len);
    c->out_len += len;
}

/* Write what we can. Returns 0 when everything is written, 1 when the socket is full, -1 on
 * error. */
static int out_flush(struct conn *c) {
    size_t done = 0;
    while (done < c->out_len) {
        ssize_t n = send(c->fd, c->out + done, c->out_len - done, MSG_NOSIGNAL);
        if (n > 0) {
            done += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            break;
        } else {
            return -1;
        }
    }
    memmove(c->out, c->out + done, c->out_len - done);
    c->out_len -= done;
    return c->out_len == 0 ? 0 : 1;
}

/* ---------- HTTP ---------- */

static unsigned long busy_loop(void) {
    volatile unsigned long acc = 0;
    for (long i = 0; i < CPU_ITERATIONS; i++) acc = acc * 31 + i;
    return acc;
}

/* Does the header block contain "Name: ...token..." (case-insensitive)? */
static int header_has(const char *head, size_t len, const char *name, const char *token) {
    size_t name_len = strlen(name);
    const char *line = memchr(head, '\n', len);
    while (line != NULL && (size_t)(line + 1 - head) < len) {
        line++;
        const char *end = memchr(line, '\n', len - (size_t)(line - head));
        if (end == NULL) break;
        size_t line_len = (size_t)(end - line);
        if (line_len > name_len && strncasecmp(line, name, name_len) == 0 && line[name_len] == ':') {
            char value[256];
            size_t v_len = line_len - name_len - 1;
            if (v_len >= sizeof value) v_len = sizeof value - 1;
            memcpy(value, line + name_len + 1, v_len);
            value[v_len] = '\0';
            if (strcasestr(value, token) != NULL) return 1;
        }
        line = end;
    }
    return 0;
}

static long content_length(const char *head, size_t len) {
    static const char name[] = "\ncontent-length:";
    for (size_t i = 0; i + sizeof name - 1 < len; i++) {
        if (strncasecmp(head + i, name, sizeof name - 1) == 0) return atol(head + i + sizeof name - 1);
    }
    return 0;
}

static int path_is(const char *target, size_t len, const char *path) {
    size_t p = strlen(path);
    return len >= p && memcmp(target, path, p) == 0 && (len == p || target[p] == '?');
}

/* Append the response for one request (the header block `head` of `len` bytes). */
static void respond(struct conn *c, const char *head, size_t len) {
    const char *target = memchr(head, ' ', len);
    const char *target_end = target ? memchr(target + 1, ' ', len - (size_t)(target + 1 - head)) : NULL;
    int http10 = len > 8 && memmem(head, len, "HTTP/1.0\r", 9) != NULL;
    c->close_after = http10 ? !header_has(head, len, "connection", "keep-alive")
                            : header_has(head, len, "connection", "close");

    char body[128];
    const char *status = "200 OK";
    if (target == NULL || target_end == NULL) {
        status = "400 Bad Request";
        snprintf(body, sizeof body, "bad request (pid %s)\n", pid_text);
        c->close_after = 1;
    } else {
        size_t t_len = (size_t)(target_end - target - 1);
        if (path_is(target + 1, t_len, "/")) {
            snprintf(body, sizeof body, "hello from pid %s\n", pid_text);
        } else if (path_is(target + 1, t_len, "/cpu")) {
            snprintf(body, sizeof body, "cpu %lu from pid %s\n", busy_loop(), pid_text);
        } else {
            status = "404 Not Found";
            snprintf(body, sizeof body, "not found (pid %s)\n", pid_text);
        }
    }
    char response[512];
    int n = snprintf(response, sizeof response,
                     "HTTP/1.1 %s\r\nContent-Type: text/plain\r\nContent-Length: %zu\r\nX-Pid: %s\r\n%s\r\n%s",
                     status, strlen(body), pid_text, c->close_after ? "Connection: close\r\n" : "", body);
    out_append(c, response, (size_t)n);
}

/* Answer every complete request in the input buffer. Returns 0 to keep going, -1 to close. */
static int serve_buffered(struct conn *c) {
    while (!c->close_after) {
        char *end = memmem(c->in, c->in_len, "\r\n\r\n", 4);
        if (end == NULL) {
            if (c->in_len == IN_CAP) return -1; /* header block too large */
            return 0;
        }
        size_t head_len = (size_t)(end - c->in) + 4;
        long body_len = content_length(c->in, head_len);
        if (body_len < 0 || (size_t)body_len > IN_CAP - head_len) return -1;
        if (c->in_len < head_len + (size_t)body_len) return 0; /* body still arriving */
        respond(c, c->in, head_len);
        size_t used = head_len + (size_t)body_len;
        memmove(c->in, c->in + used, c->in_len - used);
        c->in_len -= used;
    }
    return 0;
}

/* Read what arrived. Returns 0 to keep the connection, -1 to close it. */
static int on_readable(struct conn *c) {
    for (;;) {
        if (c->in_len == IN_CAP) return -1;
        ssize_t n = recv(c->fd, c->in + c->in_len, IN_CAP - c->in_len, 0);
        if (n > 0) {
            c->in_len += (size_t)n;
            continue;
        }
        if (n == 0) return -1; /* peer closed */
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) break;
        return -1;
    }
    return serve_buffered(c);
}

/* ---------- event loop ---------- */

static void watch(int epfd, int op, struct conn *c, unsigned events) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    if (epoll_ctl(epfd, op, c->fd, &ev) < 0) die("epoll_ctl");
}

/* One connection per wake-up (nginx's default, `multi_accept off`): a worker sharing one
 * socket with others does not drain the whole queue for itself. */
static void accept_one(int epfd, int listener) {
    int fd = accept4(listener, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) return; /* EAGAIN (another worker took it), ECONNABORTED, EMFILE...: next wake-up */
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    watch(epfd, EPOLL_CTL_ADD, conn_new(fd), EPOLLIN | EPOLLRDHUP);
}

/* One readiness event on a client connection. */
static void on_conn_event(int epfd, struct conn *c, unsigned events) {
    int keep = (events & (EPOLLERR | EPOLLHUP)) ? -1 : 0;
    if (keep == 0 && (events & (EPOLLIN | EPOLLRDHUP))) keep = on_readable(c);
    if (keep == 0 && c->out_len > 0) keep = out_flush(c) < 0 ? -1 : 0;
    if (keep < 0 || (c->close_after && c->out_len == 0)) {
        conn_free(c);
        return;
    }
    watch(epfd, EPOLL_CTL_MOD, c, c->out_len > 0 ? EPOLLOUT : EPOLLIN | EPOLLRDHUP);
}

static void install_signals(void) {
    struct sigaction sa = {0};
    sa.sa_handler = on_stop_signal; /* no SA_RESTART: epoll_wait returns EINTR */
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
}

int main(void) {
    snprintf(pid_text, sizeof pid_text, "%d", (int)getpid());
    install_signals();
    const char *where;
    int listener = open_listener(&where);
    int epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) die("epoll_create1");
    struct conn listen_conn = {.fd = listener};
    watch(epfd, EPOLL_CTL_ADD, &listen_conn, EPOLLIN | EPOLLEXCLUSIVE);
    fprintf(stderr, "ready pid=%s on %s\n", pid_text, where);

    struct epoll_event events[MAX_EVENTS];
    while (!stopping) {
        int n = epoll_wait(epfd, events, MAX_EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            struct conn *c = events[i].data.ptr;
            if (c == &listen_conn) {
                accept_one(epfd, listener);
            } else {
                on_conn_event(epfd, c, events[i].events);
            }
        }
    }
    return 0;
}
