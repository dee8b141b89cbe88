/* A worker for bench/logs.py: prints short numbered log lines to stdout, forever. Serves
 * nothing. Without arguments as fast as it can (stdio fully buffered, 64 KiB writes); with
 * `lines.c RATE`, RATE lines per second, written out every millisecond. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

int main(int argc, char **argv) {
    static char buf[1 << 16];
    const char *slot = getenv("REUSE_LAUNCH_SLOT");
    double rate = argc > 1 ? atof(argv[1]) : 0;
    setvbuf(stdout, buf, _IOFBF, sizeof buf);
    struct timespec next;
    clock_gettime(CLOCK_MONOTONIC, &next);
    double owed = 0;
    for (unsigned long i = 0;;) {
        if (rate <= 0) {
            if (printf("worker %s line %lu: a short log line\n", slot ? slot : "-", i++) < 0) return 1;
            continue;
        }
        for (owed += rate / 1000; owed >= 1; owed--) {
            if (printf("worker %s line %lu: a short log line\n", slot ? slot : "-", i++) < 0) return 1;
        }
        if (fflush(stdout) != 0) return 1;
        next.tv_nsec += 1000000;
        if (next.tv_nsec >= 1000000000) {
            next.tv_nsec -= 1000000000;
            next.tv_sec++;
        }
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL);
    }
}
