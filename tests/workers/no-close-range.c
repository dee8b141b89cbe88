/*
 * no-close-range.c: run a program under a seccomp filter that refuses close_range(2) with
 * EPERM, as container seccomp profiles written before it existed do (and as a kernel before
 * 5.9 refuses it with ENOSYS). Used by tests/it/core.rs: the launcher must then spawn its
 * workers as before, copying its whole fd table, instead of failing every spawn.
 *
 *   no-close-range PROGRAM [ARG...]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: no-close-range PROGRAM [ARG...]\n");
        return 2;
    }
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_close_range, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {sizeof f / sizeof f[0], f};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog)) {
        perror("no-close-range: seccomp");
        return 1;
    }
    execvp(argv[1], argv + 1);
    perror("no-close-range: exec");
    return 127;
}
