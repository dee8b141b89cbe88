/*
 * queues.c: what one reading of every accept queue costs, two ways (issue 18).
 *
 * Binds N SO_REUSEPORT listeners on 127.0.0.1 (one port, as the launcher's slots), queues one
 * connection on the first, then times R rounds of each way of reading every queue length:
 *   - getsockopt: one getsockopt(TCP_INFO) per listener (tcpi_unacked), N system calls;
 *   - sock_diag:  one NETLINK_SOCK_DIAG dump (inet_diag_req_v2, LISTEN only, filtered to the
 *                 port), every listener's idiag_rqueue in one reply, matched by inode.
 * Both must read the same lengths (checked). Prints the time per round (CPU time of this
 * process, user + system, from getrusage) and what that is at 50 rounds a second (the stall
 * watch's 20 ms cadence), in % of one core.
 *
 *   gcc -O2 -Wall -o queues bench/queues.c && ./queues 64 512 1024
 *   (bench/idle.py builds and runs it with its own counts: --queues)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/inet_diag.h>
#include <linux/netlink.h>
#include <linux/sock_diag.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

static double cpu_now(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_stime.tv_sec + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

static int listener(uint16_t *port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(*port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) || listen(fd, 128)) {
        perror("bind/listen");
        exit(1);
    }
    socklen_t len = sizeof a;
    getsockname(fd, (struct sockaddr *)&a, &len);
    *port = ntohs(a.sin_port);
    return fd;
}

/* Sum of the queue lengths by getsockopt. */
static long by_getsockopt(const int *fds, int n, uint32_t *lens) {
    long sum = 0;
    for (int i = 0; i < n; i++) {
        struct tcp_info ti;
        socklen_t len = sizeof ti;
        if (getsockopt(fds[i], IPPROTO_TCP, TCP_INFO, &ti, &len) == 0) {
            lens[i] = ti.tcpi_unacked;
            sum += ti.tcpi_unacked;
        }
    }
    return sum;
}

/* The listeners by inode, sorted, for a binary search (as the launcher's map). */
struct slot {
    ino_t ino;
    int index;
};
static int by_ino(const void *a, const void *b) {
    ino_t x = ((const struct slot *)a)->ino, y = ((const struct slot *)b)->ino;
    return x < y ? -1 : x > y;
}
static int find(const struct slot *sorted, int n, uint32_t ino) {
    struct slot key = {.ino = ino};
    const struct slot *s = bsearch(&key, sorted, n, sizeof key, by_ino);
    return s ? s->index : -1;
}

/* Sum of the queue lengths by one sock_diag dump; -1 on failure. */
static long by_diag(int nl, uint16_t port, const struct slot *inodes, int n, uint32_t *lens) {
    struct {
        struct nlmsghdr nh;
        struct inet_diag_req_v2 r;
    } req = {
        .nh = {.nlmsg_len = sizeof req, .nlmsg_type = SOCK_DIAG_BY_FAMILY, .nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP},
        .r = {.sdiag_family = AF_INET, .sdiag_protocol = IPPROTO_TCP, .idiag_states = 1 << 10 /* TCP_LISTEN */},
    };
    req.r.id.idiag_sport = htons(port);
    if (send(nl, &req, sizeof req, 0) < 0) return -1;
    static char buf[65536];
    long sum = 0;
    for (;;) {
        ssize_t got = recv(nl, buf, sizeof buf, 0);
        if (got < 0) return -1;
        for (struct nlmsghdr *h = (struct nlmsghdr *)buf; NLMSG_OK(h, got); h = NLMSG_NEXT(h, got)) {
            if (h->nlmsg_type == NLMSG_DONE) return sum;
            if (h->nlmsg_type == NLMSG_ERROR) return -1;
            struct inet_diag_msg *m = NLMSG_DATA(h);
            int i = find(inodes, n, m->idiag_inode);
            if (i >= 0) {
                lens[i] = m->idiag_rqueue;
                sum += m->idiag_rqueue;
            }
        }
    }
}

/* Sum of the queue lengths by an epoll set (level-triggered, EPOLLIN on every listener):
 * epoll_wait with no timeout lists the listeners whose queue is not empty, and only those are
 * read with getsockopt. The others are empty for sure. */
static long by_epoll(int ep, const int *fds, int n, uint32_t *lens) {
    static struct epoll_event ev[1024];
    long sum = 0;
    int got = epoll_wait(ep, ev, 1024, 0);
    memset(lens, 0, n * sizeof *lens);
    for (int i = 0; i < got; i++) {
        int k = (int)ev[i].data.u32;
        struct tcp_info ti;
        socklen_t len = sizeof ti;
        if (getsockopt(fds[k], IPPROTO_TCP, TCP_INFO, &ti, &len) == 0) {
            lens[k] = ti.tcpi_unacked;
            sum += ti.tcpi_unacked;
        }
    }
    return sum;
}

int main(int argc, char **argv) {
    int rounds = 2000;
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    printf("%7s  %16s  %16s  %16s\n", "sockets", "getsockopt", "sock_diag", "epoll+getsockopt");
    for (int a = 1; a < argc; a++) {
        int n = atoi(argv[a]);
        int *fds = calloc(n, sizeof *fds);
        struct slot *inodes = calloc(n, sizeof *inodes);
        uint32_t *l1 = calloc(n, sizeof *l1), *l2 = calloc(n, sizeof *l2);
        uint16_t port = 0;
        for (int i = 0; i < n; i++) {
            fds[i] = listener(&port);
            struct stat st;
            fstat(fds[i], &st);
            inodes[i] = (struct slot){st.st_ino, i};
        }
        qsort(inodes, n, sizeof *inodes, by_ino);
        /* One connection waits somewhere: both ways must find it. */
        int c = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(port)};
        to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        connect(c, (struct sockaddr *)&to, sizeof to);
        usleep(20000);
        int nl = socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_SOCK_DIAG);
        int ep = epoll_create1(EPOLL_CLOEXEC);
        for (int i = 0; i < n; i++) {
            struct epoll_event e = {.events = EPOLLIN, .data.u32 = i};
            epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &e);
        }
        uint32_t *l3 = calloc(n, sizeof *l3);
        long s1 = by_getsockopt(fds, n, l1), s2 = by_diag(nl, port, inodes, n, l2), s3 = by_epoll(ep, fds, n, l3);
        if (s1 != 1 || s2 != 1 || s3 != 1 || memcmp(l1, l2, n * sizeof *l1) || memcmp(l1, l3, n * sizeof *l1)) {
            fprintf(stderr, "the ways disagree: getsockopt %ld, sock_diag %ld, epoll %ld\n", s1, s2, s3);
            return 1;
        }
        double t0 = cpu_now();
        for (int r = 0; r < rounds; r++) by_getsockopt(fds, n, l1);
        double t1 = cpu_now();
        for (int r = 0; r < rounds; r++) by_diag(nl, port, inodes, n, l2);
        double t2 = cpu_now();
        for (int r = 0; r < rounds; r++) by_epoll(ep, fds, n, l3);
        double t3 = cpu_now();
        double g = (t1 - t0) / rounds * 1e6, d = (t2 - t1) / rounds * 1e6, e = (t3 - t2) / rounds * 1e6;
        printf("%7d  %6.1f us %5.2f%%  %6.1f us %5.2f%%  %6.1f us %5.2f%%\n", n, g, g * 50 / 1e4, d, d * 50 / 1e4,
               e, e * 50 / 1e4);
        close(c);
        close(ep);
        free(l3);
        close(nl);
        for (int i = 0; i < n; i++) close(fds[i]);
        free(fds);
        free(inodes);
        free(l1);
        free(l2);
    }
    return 0;
}
