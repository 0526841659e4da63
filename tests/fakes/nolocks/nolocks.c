/* LD_PRELOAD library: a file system without file locks, as Lustre mounted without `flock`
 * (or NFS without a lock manager) is. flock() and fcntl() byte-range locks on files under
 * $NOLOCKS_PREFIX fail with ENOSYS (NOLOCKS_ERRNO=ENOLCK for NFS's answer); every other call
 * and every other file is left alone. Built by tests/test_filesystems.py. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int under_prefix(int fd) {
    const char *prefix = getenv("NOLOCKS_PREFIX");
    char link[64], path[PATH_MAX];
    ssize_t n;
    if (prefix == NULL || *prefix == '\0') return 0;
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    n = readlink(link, path, sizeof path - 1);
    if (n < 0) return 0;
    path[n] = '\0';
    return strncmp(path, prefix, strlen(prefix)) == 0;
}

static int refuse(void) {
    const char *name = getenv("NOLOCKS_ERRNO");
    errno = (name != NULL && strcmp(name, "ENOLCK") == 0) ? ENOLCK : ENOSYS;
    return -1;
}

static int is_lock_cmd(int cmd) {
    return cmd == F_SETLK || cmd == F_SETLKW || cmd == F_GETLK
        || cmd == F_OFD_SETLK || cmd == F_OFD_SETLKW || cmd == F_OFD_GETLK;
}

int flock(int fd, int operation) {
    static int (*real)(int, int);
    if (under_prefix(fd)) return refuse();
    if (real == NULL) real = (int (*)(int, int))dlsym(RTLD_NEXT, "flock");
    return real(fd, operation);
}

static int call_fcntl(const char *symbol, int fd, int cmd, void *arg) {
    int (*real)(int, int, ...) = (int (*)(int, int, ...))dlsym(RTLD_NEXT, symbol);
    if (is_lock_cmd(cmd) && under_prefix(fd)) return refuse();
    return real(fd, cmd, arg);
}

int fcntl(int fd, int cmd, ...) {
    va_list ap;
    void *arg;
    va_start(ap, cmd);
    arg = va_arg(ap, void *);
    va_end(ap);
    return call_fcntl("fcntl", fd, cmd, arg);
}

int fcntl64(int fd, int cmd, ...) {
    va_list ap;
    void *arg;
    va_start(ap, cmd);
    arg = va_arg(ap, void *);
    va_end(ap);
    return call_fcntl("fcntl64", fd, cmd, arg);
}
