/* Folder work of `prep imagenet` in single C calls (prep/fastdir.py, through ctypes, which
 * releases the GIL for the call).
 *
 * fd_list: one folder's entry names, sorted and joined. Listing 1.28 M train names through
 * os.scandir costs ~1 us of Python per name (a DirEntry, a str, the checks, the sort);
 * `find` spends a fraction of that. This reads the entries with readdir, notes whether
 * every one is a regular file (d_type) and every name printable ASCII, sorts them bytewise
 * (the order of Python's sort for ASCII) and joins them with '\n'. Python then checks the
 * joined string (prep/scan.py) and takes the per-entry path for any folder that is not plain.
 *
 * fd_symlinks: a folder's links (val/WNID/*, 50 each) made without a Python step per link,
 * so that other threads run Python meanwhile.
 */
#include <dirent.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define FD_ALL_REGULAR 1
#define FD_ALL_PRINTABLE 2

int fd_abi(void) { return 1; }

static int by_name(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

void fd_free(char *p) { free(p); }

/* Lists `path`. On success returns the number of entries (without . and ..), sets *out to
 * a malloc'd buffer of the sorted names joined by '\n' (*len bytes, no trailing '\n'; free
 * with fd_free) and *flags to FD_ALL_REGULAR | FD_ALL_PRINTABLE as they hold. On failure
 * returns -errno and sets *out to NULL. */
long fd_list(const char *path, char **out, size_t *len, int *flags) {
    *out = NULL;
    *len = 0;
    *flags = FD_ALL_REGULAR | FD_ALL_PRINTABLE;
    DIR *d = opendir(path);
    if (!d)
        return -errno;
    size_t cap = 1 << 16, used = 0, n = 0, ocap = 1024;
    char *names = malloc(cap);
    size_t *offs = malloc(ocap * sizeof *offs);
    if (!names || !offs)
        goto oom;
    struct dirent *e;
    errno = 0;
    while ((e = readdir(d)) != NULL) {
        const char *s = e->d_name;
        if (s[0] == '.' && (s[1] == 0 || (s[1] == '.' && s[2] == 0)))
            continue;
        size_t k = strlen(s);
        if (used + k + 1 > cap) {
            while (used + k + 1 > cap)
                cap *= 2;
            char *grown = realloc(names, cap);
            if (!grown)
                goto oom;
            names = grown;
        }
        if (n == ocap) {
            ocap *= 2;
            size_t *grown = realloc(offs, ocap * sizeof *offs);
            if (!grown)
                goto oom;
            offs = grown;
        }
        if (e->d_type != DT_REG)
            *flags &= ~FD_ALL_REGULAR;
        for (size_t i = 0; i < k; i++)
            if ((unsigned char)s[i] < 0x20 || (unsigned char)s[i] > 0x7e) {
                *flags &= ~FD_ALL_PRINTABLE;
                break;
            }
        memcpy(names + used, s, k + 1);
        offs[n++] = used;
        used += k + 1;
        errno = 0;
    }
    if (errno) {
        int err = errno;
        closedir(d);
        free(names);
        free(offs);
        return -err;
    }
    closedir(d);
    /* the buffer is final now: sort pointers into it (no shared state: threads may list) */
    char **sorted = malloc((n ? n : 1) * sizeof *sorted);
    char *joined = malloc(used ? used : 1);
    if (!sorted || !joined) {
        free(sorted);
        free(joined);
        goto oom_closed;
    }
    for (size_t i = 0; i < n; i++)
        sorted[i] = names + offs[i];
    qsort(sorted, n, sizeof *sorted, by_name);
    size_t at = 0;
    for (size_t i = 0; i < n; i++) {
        size_t k = strlen(sorted[i]);
        if (i)
            joined[at++] = '\n';
        memcpy(joined + at, sorted[i], k);
        at += k;
    }
    free(sorted);
    free(names);
    free(offs);
    *out = joined;
    *len = at;
    return (long)n;
oom:
    closedir(d);
oom_closed:
    free(names);
    free(offs);
    return -ENOMEM;
}

/* Makes `n` symlinks in the open directory `dirfd`: the i-th name of `names` (n strings,
 * each ended by '\0') pointing to the i-th target of `targets` (likewise). Returns how many
 * were made before the first failure (n when none failed), and that failure's errno in
 * *err. The caller handles the failed one (an existing link to replace) and goes on. */
long fd_symlinks(int dirfd, const char *names, const char *targets, long n, int *err) {
    *err = 0;
    for (long i = 0; i < n; i++) {
        if (symlinkat(targets, dirfd, names) != 0) {
            *err = errno;
            return i;
        }
        names += strlen(names) + 1;
        targets += strlen(targets) + 1;
    }
    return n;
}
