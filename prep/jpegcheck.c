/* Is this JPEG whole? Entropy-decode every scan with libjpeg-turbo and listen to its warnings.
 *
 * A JPEG cut short and given an EOI marker back decodes without error in Pillow (libjpeg
 * warns "Corrupt JPEG data: premature end of data segment" and fills the rest with grey,
 * and Pillow drops warnings). This check reads all DCT coefficients (jpeg_read_coefficients:
 * Huffman decoding only, no IDCT, upsampling or colour conversion, about a third of a full
 * decode) and reports that warning, or the end of the file before the end of the image.
 * The header is checked first: no dimension 0, no more pixels than `max_pixels`, so a
 * 3 KB file that claims 45000 x 45000 is refused before anything is allocated.
 *
 * Loaded with ctypes by prep/jpeg.py; used by `prep imagenet --check full`, `prep shard`
 * (through shards/tarpack.c, which gets this function's address) and `prep verify --deep`.
 * Returns JC_OK, or one of the codes below with a message in msg (200 bytes).
 */
#include <setjmp.h>
#include <stdio.h>
#include <string.h>
#include <jpeglib.h>
#include <jerror.h>

enum { JC_OK = 0, JC_ERROR = 1, JC_TRUNCATED = 2, JC_EMPTY = 3, JC_TOO_LARGE = 4 };

struct err {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    int truncated;
};

static void on_error(j_common_ptr c) { longjmp(((struct err *)c->err)->jump, 1); }

static void on_message(j_common_ptr c, int level) {
    struct err *e = (struct err *)c->err;
    if (level < 0) {
        int code = e->pub.msg_code;
        if (code == JWRN_HIT_MARKER || code == JWRN_JPEG_EOF) e->truncated = 1;
        e->pub.num_warnings++;
    }
}

int jc_check(const unsigned char *data, unsigned long size, unsigned long long max_pixels,
             int *dims, char *msg)
{
    struct jpeg_decompress_struct c;
    struct err e;
    int status = JC_OK;
    dims[0] = dims[1] = dims[2] = 0;
    msg[0] = 0;
    c.err = jpeg_std_error(&e.pub);
    e.pub.error_exit = on_error;
    e.pub.emit_message = on_message;
    e.truncated = 0;
    if (setjmp(e.jump)) {
        (*c.err->format_message)((j_common_ptr)&c, msg);
        jpeg_destroy_decompress(&c);
        return JC_ERROR;
    }
    jpeg_create_decompress(&c);
    jpeg_mem_src(&c, data, size);
    jpeg_read_header(&c, TRUE);
    dims[0] = (int)c.image_width;
    dims[1] = (int)c.image_height;
    dims[2] = c.num_components;
    if (c.image_width == 0 || c.image_height == 0) {
        snprintf(msg, 200, "image is %ux%u pixels", c.image_width, c.image_height);
        status = JC_EMPTY;
    } else if ((unsigned long long)c.image_width * c.image_height > max_pixels) {
        snprintf(msg, 200, "image is %ux%u = %llu pixels, above the limit of %llu",
                 c.image_width, c.image_height,
                 (unsigned long long)c.image_width * c.image_height, max_pixels);
        status = JC_TOO_LARGE;
    } else {
        jpeg_read_coefficients(&c);
        if (e.truncated) {
            strcpy(msg, "premature end of data (the file is cut short; libjpeg would fill "
                        "the rest with grey)");
            status = JC_TRUNCATED;
        }
    }
    jpeg_abort_decompress(&c);
    jpeg_destroy_decompress(&c);
    return status;
}
