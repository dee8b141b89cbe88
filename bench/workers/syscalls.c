/*
 * syscalls.c: how long a cheap system call takes in this process (bench/intercept.py).
 *
 *   syscalls CALLS [REPEATS [allow-all]]
 *
 * Makes CALLS raw getppid() system calls (syscall(2): no libc cache, no vDSO) REPEATS times
 * (default 5) after a warm-up, prints `syscalls: CALLS calls, NS ns each (best of REPEATS,
 * median M)` on stdout, then waits for a signal. Run under reuse-launch with --intercept-bind on
 * and off, it shows what the bind()/listen() seccomp filter costs every other system call.
 * With `allow-all` it first installs a seccomp filter of its own that allows everything (one
 * instruction: the least any filter can cost), which tells the cost of the kernel's seccomp
 * entry path from the cost of a particular filter.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sys/prctl.h>
#include <string.h>

static double now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    long calls = argc > 1 ? atol(argv[1]) : 1000000;
    int repeats = argc > 2 ? atoi(argv[2]) : 5;
    if (calls <= 0 || repeats <= 0 || repeats > 100) {
        fprintf(stderr, "usage: syscalls CALLS [REPEATS<=100]\n");
        return 2;
    }
    if (argc > 3 && strcmp(argv[3], "allow-all") == 0) {
        struct sock_filter allow[] = {BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW)};
        struct sock_fprog prog = {1, allow};
        if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 ||
            syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_SPEC_ALLOW, &prog) != 0) {
            perror("syscalls: seccomp");
            return 1;
        }
    }
    double each[100];
    for (long i = 0; i < calls / 10; i++) syscall(SYS_getppid);
    for (int r = 0; r < repeats; r++) {
        double start = now_ns();
        for (long i = 0; i < calls; i++) syscall(SYS_getppid);
        each[r] = (now_ns() - start) / calls;
    }
    qsort(each, repeats, sizeof each[0], cmp);
    printf("syscalls: %ld calls, %.2f ns each (best of %d, median %.2f)\n", calls, each[0], repeats, each[repeats / 2]);
    fflush(stdout);
    pause();
    return 0;
}
