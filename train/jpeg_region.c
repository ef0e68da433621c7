/* Decode only a region of a JPEG, optionally at 1/2, 1/4 or 1/8 DCT scale (libjpeg-turbo).
 *
 * Rows above the region are skipped (entropy-decoded only: jpeg_skip_scanlines), rows below
 * are never read, columns outside it are not transformed (jpeg_crop_scanline), so a
 * RandomResizedCrop costs a fraction of a full decode. No Python library exposes this part
 * of libjpeg-turbo (Pillow, simplejpeg, PyTurboJPEG on TurboJPEG 2, torchvision decode whole
 * images), hence these few lines, loaded with ctypes by train/jpeg_region.py.
 *
 * Output: RGBX rows (4 bytes per pixel, the layout Pillow maps without copying).
 * Returns 0 and info = {left, width, top, rows} of what was written (left/width are widened
 * to whole iMCUs by libjpeg), or -1 (libjpeg error, message in msg), -2 (buffer too small),
 * -3 (a warning such as premature end of data: the caller lets Pillow report it), -4 (the
 * request itself is wrong: a scale other than 1/2/4/8, a box outside the image, or more
 * pixels than max_pixels; checked here as well as in Python).
 */
#include <setjmp.h>
#include <stdio.h>
#include <string.h>
#include <jpeglib.h>

struct err {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
};

static void on_error(j_common_ptr c) { longjmp(((struct err *)c->err)->jump, 1); }
static void on_message(j_common_ptr c, int level) { (void)c; (void)level; }

int jr_decode(const unsigned char *data, unsigned long size, int x, int y, int w, int h,
              int denom, unsigned long long max_pixels, unsigned char *out,
              unsigned long capacity, int *info, char *msg)
{
    if ((denom != 1 && denom != 2 && denom != 4 && denom != 8) || x < 0 || y < 0 || w <= 0 ||
        h <= 0) {
        snprintf(msg, 200, "bad request: box %d,%d %dx%d, scale 1/%d", x, y, w, h, denom);
        return -4;
    }
    struct jpeg_decompress_struct c;
    struct err e;
    c.err = jpeg_std_error(&e.pub);
    e.pub.error_exit = on_error;
    e.pub.emit_message = on_message;
    if (setjmp(e.jump)) {
        (*c.err->format_message)((j_common_ptr)&c, msg);
        jpeg_destroy_decompress(&c);
        return -1;
    }
    jpeg_create_decompress(&c);
    jpeg_mem_src(&c, data, size);
    jpeg_read_header(&c, TRUE);
    if (c.image_width == 0 || c.image_height == 0 ||
        (unsigned long long)c.image_width * c.image_height > max_pixels ||
        (unsigned long)x + w > c.image_width + 1UL || (unsigned long)y + h > c.image_height + 1UL) {
        snprintf(msg, 200, "bad request: box %d,%d %dx%d in a %ux%u image (limit %llu pixels)",
                 x, y, w, h, c.image_width, c.image_height, max_pixels);
        jpeg_destroy_decompress(&c);
        return -4;
    }
    c.out_color_space = JCS_EXT_RGBX;
    c.scale_num = 1;
    c.scale_denom = denom;
    jpeg_start_decompress(&c);
    JDIMENSION x0 = x / denom, x1 = (x + w + denom - 1) / denom;
    JDIMENSION y0 = y / denom, y1 = (y + h + denom - 1) / denom;
    if (x1 > c.output_width) x1 = c.output_width;
    if (y1 > c.output_height) y1 = c.output_height;
    JDIMENSION left = x0, width = x1 - x0;
    if (width < c.output_width) jpeg_crop_scanline(&c, &left, &width);
    unsigned long stride = (unsigned long)width * 4;
    if (stride * (y1 - y0) > capacity) {
        strcpy(msg, "output buffer too small");
        jpeg_destroy_decompress(&c);
        return -2;
    }
    if (y0 > 0) jpeg_skip_scanlines(&c, y0);
    while (c.output_scanline < y1) {
        JSAMPROW row = out + stride * (c.output_scanline - y0);
        jpeg_read_scanlines(&c, &row, 1);
    }
    info[0] = (int)left;
    info[1] = (int)width;
    info[2] = (int)y0;
    info[3] = (int)(y1 - y0);
    int warned = e.pub.num_warnings > 0;
    jpeg_abort_decompress(&c);
    jpeg_destroy_decompress(&c);
    if (warned) {
        strcpy(msg, "libjpeg warning (damaged or truncated data)");
        return -3;
    }
    return 0;
}
