/* Pass-through shard writing in C (shards/tarpack.py loads it with ctypes).
 *
 * For each sample: read the source file, check that it is a complete 8-bit, 3-component
 * JPEG (the same rules as shards/image.py: SOF marker, EOI at the end), and append its
 * members (cls, jpg, json) to the tar with one writev, exactly the bytes shards/write.py
 * writes for it. A sample that is anything else (or unreadable, or with a name too long
 * for a USTAR header) stops the call *before* anything of it is written, so that Python
 * repairs or reports it. Used for pass-through sharding only (Python resizes). Each
 * written JPEG's CRC-32 (zlib's, as Python's zlib.crc32) goes to the index, where the
 * loader checks it on every read: through `crc` when given (ISA-L's crc32_gzip_refl, the
 * same values ~10x faster, prep/crc.py), else through zlib.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>
#include <zlib.h>

#define BLOCK 512
#define MTIME 011747623600LL /* 1335830400, as shards/tario.py */
#define MAX_MEMBER 077777777777LL /* the largest size an 11-digit octal tar field holds */

static const char ZEROS[BLOCK];

static void header(unsigned char *h, const char *key, const char *ext, long long size) {
    memset(h, 0, BLOCK);
    snprintf((char *)h, 101, "%s.%s", key, ext);
    memcpy(h + 100, "0000444", 8);
    memcpy(h + 108, "0000000", 8);
    memcpy(h + 116, "0000000", 8);
    snprintf((char *)h + 124, 12, "%011llo", size);
    snprintf((char *)h + 136, 12, "%011llo", MTIME);
    memset(h + 148, ' ', 8);
    h[156] = '0';
    memcpy(h + 257, "ustar\0" "00", 8);
    unsigned sum = 0;
    for (int i = 0; i < BLOCK; i++) sum += h[i];
    snprintf((char *)h + 148, 8, "%06o", sum); /* "%06o\0" then the space kept below */
    h[155] = ' ';
}

/* (width, height) of a clean 8-bit 3-component JPEG, else 0 (shards/image.py jpeg_sof). */
static int jpeg_size(const unsigned char *d, size_t n, int *w, int *h) {
    if (n < 4 || d[0] != 0xFF || d[1] != 0xD8) return 0;
    size_t i = 2;
    while (i + 9 < n) {
        if (d[i] != 0xFF) return 0;
        unsigned m = d[i + 1];
        if (m == 0xFF) { i++; continue; }
        if ((m >= 0xC0 && m <= 0xCF) && m != 0xC4 && m != 0xC8 && m != 0xCC) {
            if (d[i + 4] != 8 || d[i + 9] != 3) return 0;
            *h = (d[i + 5] << 8) | d[i + 6];
            *w = (d[i + 7] << 8) | d[i + 8];
            return 1;
        }
        if (m == 0xDA) return 0;
        i += 2 + ((d[i + 2] << 8) | d[i + 3]);
    }
    return 0;
}

static int complete(const unsigned char *d, size_t n) {
    while (n > 0 && (d[n - 1] == 0 || d[n - 1] == '\r' || d[n - 1] == '\n' || d[n - 1] == ' '))
        n--;
    return n >= 2 && d[n - 2] == 0xFF && d[n - 1] == 0xD9;
}

static int write_all(int fd, struct iovec *v, int cnt) {
    while (cnt > 0) {
        ssize_t k = writev(fd, v, cnt);
        if (k < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        while (cnt > 0 && (size_t)k >= v->iov_len) { k -= v->iov_len; v++; cnt--; }
        if (cnt > 0) { v->iov_base = (char *)v->iov_base + k; v->iov_len -= k; }
    }
    return 0;
}

static void identity(const struct stat *st, long long *id) {
    id[0] = (long long)st->st_size;
    id[1] = (long long)st->st_mtim.tv_sec * 1000000000LL + st->st_mtim.tv_nsec;
    id[2] = (long long)st->st_ctim.tv_sec * 1000000000LL + st->st_ctim.tv_nsec;
    id[3] = (long long)st->st_ino;
    id[4] = (long long)st->st_dev;
}

/* Read all of `path` into *buf (grown as needed); its size, or -1. id: the file's identity
 * (prep/checked.py) read from the descriptor the bytes come from: size, mtime and ctime in
 * ns, inode, device. */
static long long read_file(const char *path, unsigned char **buf, size_t *cap,
                           long long *id) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    struct stat st;
    if (fstat(fd, &st) < 0) { close(fd); return -1; }
    identity(&st, id);
    size_t want = (size_t)st.st_size + 1, got = 0;
    for (;;) {
        if (got + 1 > *cap || want > *cap) {
            size_t c = want > 2 * *cap ? want : 2 * *cap;
            unsigned char *b = realloc(*buf, c);
            if (!b) { close(fd); return -1; }
            *buf = b; *cap = c;
        }
        ssize_t k = read(fd, *buf + got, *cap - got);
        if (k < 0) { if (errno == EINTR) continue; close(fd); return -1; }
        if (k == 0) break;
        got += k;
        want = got + 1;
    }
    close(fd);
    return (long long)got;
}

/* `size` bytes at `offset` of the open archive `fd` into *buf (an archive member read in
 * place, `prep shard --src`): `size`, or -1 (a read error, or the archive ends before the
 * member does: Python then names it). */
static long long read_member(int fd, long long offset, long long size, unsigned char **buf,
                             size_t *cap) {
    if ((size_t)size + 1 > *cap) {
        unsigned char *b = realloc(*buf, (size_t)size + 1);
        if (!b) return -1;
        *buf = b; *cap = (size_t)size + 1;
    }
    long long got = 0;
    while (got < size) {
        ssize_t k = pread(fd, *buf + got, (size_t)(size - got), (off_t)(offset + got));
        if (k < 0) { if (errno == EINTR) continue; return -1; }
        if (k == 0) return -1;
        got += k;
    }
    return got;
}

/* prep/jpegcheck.c's jc_check: 0 when the JPEG decodes whole within max_pixels. */
typedef int (*check_fn)(const unsigned char *, unsigned long, unsigned long long, int *,
                        char *);
/* ISA-L's crc32_gzip_refl(init, buf, len): zlib's crc32 values. */
typedef unsigned int (*crc_fn)(unsigned int, const unsigned char *, unsigned long long);

/* Samples [0, n): returns how many were written before one needs Python (n: all), or -1
 * with errno on a write error. offset: where the next member goes; updated. A sample stops
 * the call when its size is 0 or above max_pixels, or when `check` (may be NULL) finds it
 * damaged: Python then applies --on-error to it. `check` is skipped for a sample whose
 * identity equals its ID_FIELDS values in `trusted` (checked before, unchanged since).
 * Outputs per written sample: start offset, jpg size, width, height, the source's identity
 * (ID_FIELDS in ids), whether `check` ran on it, jpg CRC-32. The read buffer lives for one
 * call: no state is shared between calls or threads. With src_fd >= 0 the samples are
 * members of that open archive (src_offsets, src_sizes; `paths` unused) and their
 * identity is the archive's. */
#define ID_FIELDS 5
static int write_samples(int out_fd, int n, const char **paths, const char **keys,
                         const int *labels, const char **json_mid, const char **json_end,
                         long long *offset, long long *starts, long long *sizes, int *widths,
                         int *heights, const long long *trusted, long long *ids, int *checked,
                         unsigned int *crcs, check_fn check, crc_fn crc,
                         unsigned long long max_pixels,
                         int src_fd, const long long *src_offsets, const long long *src_sizes,
                         unsigned char **buf, size_t *cap) {
    unsigned char hc[BLOCK], hj[BLOCK], hm[BLOCK];
    char cls[16], json[4096], msg[200];
    int dims[3];
    long long src_id[ID_FIELDS];
    if (src_fd >= 0) {
        struct stat st;
        if (fstat(src_fd, &st) < 0) return 0;
        identity(&st, src_id);
    }
    for (int i = 0; i < n; i++) {
        if (strlen(keys[i]) + 5 > 100) return i;
        long long *id = ids + (size_t)i * ID_FIELDS;
        long long size;
        if (src_fd >= 0) {
            memcpy(id, src_id, sizeof src_id);
            size = read_member(src_fd, src_offsets[i], src_sizes[i], buf, cap);
        } else {
            size = read_file(paths[i], buf, cap, id);
        }
        int w = 0, h = 0;
        if (size < 0 || !jpeg_size(*buf, size, &w, &h) || !complete(*buf, size)) return i;
        if (w == 0 || h == 0 || (unsigned long long)w * h > max_pixels) return i;
        if (size > MAX_MEMBER) return i;
        int trust = !memcmp(id, trusted + (size_t)i * ID_FIELDS, sizeof(long long) * ID_FIELDS);
        if (check && !trust && check(*buf, (unsigned long)size, max_pixels, dims, msg) != 0)
            return i;
        int jn = snprintf(json, sizeof json, "{\"format\": \"JPEG\", \"height\": %d%s%d%s",
                          h, json_mid[i], w, json_end[i]);
        if (jn < 0 || jn >= (int)sizeof json) return i;
        struct iovec v[9];
        int c = 0;
        long long start = *offset, off = *offset;
        { /* every sample has a cls; -1 on unlabelled test (HF imagenet-1k, TFDS) */
            int cn = snprintf(cls, sizeof cls, "%d", labels[i]);
            header(hc, keys[i], "cls", cn);
            v[c++] = (struct iovec){hc, BLOCK};
            v[c++] = (struct iovec){cls, cn};
            v[c++] = (struct iovec){(void *)ZEROS, (size_t)(-cn & (BLOCK - 1))};
            off += BLOCK + cn + (-cn & (BLOCK - 1));
        }
        header(hj, keys[i], "jpg", size);
        v[c++] = (struct iovec){hj, BLOCK};
        v[c++] = (struct iovec){*buf, (size_t)size};
        v[c++] = (struct iovec){(void *)ZEROS, (size_t)(-size & (BLOCK - 1))};
        off += BLOCK + size + (-size & (BLOCK - 1));
        header(hm, keys[i], "json", jn);
        v[c++] = (struct iovec){hm, BLOCK};
        v[c++] = (struct iovec){json, (size_t)jn};
        v[c++] = (struct iovec){(void *)ZEROS, (size_t)(-jn & (BLOCK - 1))};
        off += BLOCK + jn + (-jn & (BLOCK - 1));
        if (write_all(out_fd, v, c) < 0) return -1;
        *offset = off;
        starts[i] = start;
        sizes[i] = size;
        widths[i] = w;
        heights[i] = h;
        checked[i] = check && !trust;
        crcs[i] = crc ? crc(0, *buf, (unsigned long long)size)
                      : (unsigned int)crc32(0L, *buf, (uInt)size);
    }
    return n;
}

int tp_write(int out_fd, int n, const char **paths, const char **keys, const int *labels,
             const char **json_mid, const char **json_end, long long *offset,
             long long *starts, long long *sizes, int *widths, int *heights,
             const long long *trusted, long long *ids, int *checked, unsigned int *crcs,
             void *check, void *crc, unsigned long long max_pixels, int src_fd,
             const long long *src_offsets, const long long *src_sizes) {
    unsigned char *buf = NULL;
    size_t cap = 0;
    int done = write_samples(out_fd, n, paths, keys, labels, json_mid, json_end, offset,
                             starts, sizes, widths, heights, trusted, ids, checked, crcs,
                             (check_fn)check, (crc_fn)crc, max_pixels, src_fd, src_offsets,
                             src_sizes,
                             &buf, &cap);
    int saved = errno;
    free(buf);
    errno = saved;
    return done;
}

/* The call signature's version: shards/tarpack.py loads only a library that matches. */
int tp_abi(void) { return 5; }
