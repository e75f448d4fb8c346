/* A command-line driver for Hearth's native kernels, for tests/test_native_neon.py: it runs one
 * kernel on inputs read from files and writes the output to a file, so an ARM64 build of the
 * kernels (the NEON side of csrc/vec.h) can be checked under qemu-user on an x86 machine against
 * the same inputs as the x86 build. The inputs are made, and the weights packed, by model/native.py.
 *
 *   native_harness linear_bf16 M N K THREADS x w y
 *   native_harness linear_int8 M N K GROUP THREADS x w scales y
 *   native_harness linear_int4 M N K GROUP THREADS x w y
 *   native_harness attention ROWS HEADS KV_HEADS HEAD_DIM BLOCK SLOTS SCALE THREADS q keys values block_ids offsets positions out
 *   native_harness rms_norm ROWS DIM EPS THREADS x weight y
 *   native_harness silu_mul ROWS FFN THREADS gate_up out
 *   native_harness rope ROWS HEADS KV_HEADS HEAD_DIM SLOTS THREADS qkv cos sin slots qkv_out keys_out values_out
 *   native_harness lora ROWS IN OUT RANK THREADS x y a bt group_rows y_out   (one adapter, target 0, column 0)
 *
 * Exit status 0, or 1 with one line on stderr (a file, or a kernel's error status). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void hearth_linear_bf16(const float *x, int64_t ldx, const uint32_t *w, float *y, int64_t ldy, int64_t m, int64_t n,
                        int64_t k, int threads);
int hearth_linear_int8(const float *x, int64_t ldx, const int8_t *w, const float *scales, float *y, int64_t ldy,
                       int64_t m, int64_t n, int64_t k, int64_t group_size, int threads);
int hearth_linear_int4(const float *x, int64_t ldx, const uint8_t *w, float *y, int64_t ldy, int64_t m, int64_t n,
                       int64_t k, int64_t group_size, int threads);
int hearth_paged_attention(const float *q, int64_t q_row, int64_t q_head, const float *keys, const float *values,
                           int64_t kv_head_stride, const int32_t *block_ids, const int64_t *table_offsets,
                           const int32_t *positions, float *out, int64_t rows, int heads, int kv_heads, int head_dim,
                           int block_size, float scale, int threads);
int hearth_rms_norm(const float *x, int64_t ldx, const float *weight, float *y, int64_t rows, int64_t dim, float eps,
                    int threads);
void hearth_silu_mul(const float *gate_up, float *out, int64_t rows, int64_t ffn_dim, int threads);
void hearth_rope_write_kv(float *qkv, int64_t ld, const float *cos, const float *sin, int64_t rows, int heads,
                          int kv_heads, int head_dim, float *keys, float *values, int64_t kv_head_stride,
                          const int64_t *slots, int threads);

typedef float act_t;
#include "../model/csrc/lora.h"

static void *read_file(const char *path) {
    FILE *file = fopen(path, "rb");
    if (!file) { fprintf(stderr, "cannot read %s\n", path); exit(1); }
    fseek(file, 0, SEEK_END);
    const long size = ftell(file);
    fseek(file, 0, SEEK_SET);
    void *data = malloc(size + 64);
    if (!data || fread(data, 1, size, file) != (size_t)size) { fprintf(stderr, "cannot read %s\n", path); exit(1); }
    fclose(file);
    return data;
}

static void write_file(const char *path, const void *data, size_t size) {
    FILE *file = fopen(path, "wb");
    if (!file || fwrite(data, 1, size, file) != size) { fprintf(stderr, "cannot write %s\n", path); exit(1); }
    fclose(file);
}

static int64_t arg(char **argv, int i) { return strtoll(argv[i], NULL, 10); }

static int linear(int argc, char **argv) {
    const int grouped = strcmp(argv[1], "linear_bf16") != 0;
    const int64_t m = arg(argv, 2), n = arg(argv, 3), k = arg(argv, 4), group = grouped ? arg(argv, 5) : 0;
    const int threads = (int)arg(argv, 5 + grouped), files = 6 + grouped;
    if (argc < files + 3 + (strcmp(argv[1], "linear_int8") == 0)) return fprintf(stderr, "too few arguments\n"), 1;
    const float *x = read_file(argv[files]);
    float *y = malloc((size_t)(m * n) * sizeof(float));
    int status = 0;
    if (!strcmp(argv[1], "linear_bf16")) hearth_linear_bf16(x, k, read_file(argv[files + 1]), y, n, m, n, k, threads);
    else if (!strcmp(argv[1], "linear_int8"))
        status = hearth_linear_int8(x, k, read_file(argv[files + 1]), read_file(argv[files + 2]), y, n, m, n, k, group, threads);
    else status = hearth_linear_int4(x, k, read_file(argv[files + 1]), y, n, m, n, k, group, threads);
    if (status) return fprintf(stderr, "%s returned %d\n", argv[1], status), 1;
    write_file(argv[argc - 1], y, (size_t)(m * n) * sizeof(float));
    return 0;
}

static int attention(int argc, char **argv) {
    if (argc != 17) return fprintf(stderr, "attention takes 15 arguments\n"), 1;
    const int64_t rows = arg(argv, 2), heads = arg(argv, 3), kv_heads = arg(argv, 4), head_dim = arg(argv, 5);
    const int64_t block = arg(argv, 6), slots = arg(argv, 7);
    const float scale = strtof(argv[8], NULL);
    float *out = malloc((size_t)(rows * heads * head_dim) * sizeof(float));
    const int status = hearth_paged_attention(read_file(argv[10]), heads * head_dim, head_dim, read_file(argv[11]),
                                              read_file(argv[12]), slots * head_dim, read_file(argv[13]),
                                              read_file(argv[14]), read_file(argv[15]), out, rows, (int)heads,
                                              (int)kv_heads, (int)head_dim, (int)block, scale, (int)arg(argv, 9));
    if (status) return fprintf(stderr, "attention returned %d\n", status), 1;
    write_file(argv[16], out, (size_t)(rows * heads * head_dim) * sizeof(float));
    return 0;
}

static int rope(int argc, char **argv) {
    if (argc != 15) return fprintf(stderr, "rope takes 13 arguments\n"), 1;
    const int64_t rows = arg(argv, 2), heads = arg(argv, 3), kv_heads = arg(argv, 4), head_dim = arg(argv, 5);
    const int64_t slots = arg(argv, 6), width = (heads + 2 * kv_heads) * head_dim;
    float *qkv = read_file(argv[8]);
    float *keys = calloc((size_t)(kv_heads * slots * head_dim), sizeof(float));
    float *values = calloc((size_t)(kv_heads * slots * head_dim), sizeof(float));
    hearth_rope_write_kv(qkv, width, read_file(argv[9]), read_file(argv[10]), rows, (int)heads, (int)kv_heads,
                         (int)head_dim, keys, values, slots * head_dim, read_file(argv[11]), (int)arg(argv, 7));
    write_file(argv[12], qkv, (size_t)(rows * width) * sizeof(float));
    write_file(argv[13], keys, (size_t)(kv_heads * slots * head_dim) * sizeof(float));
    write_file(argv[14], values, (size_t)(kv_heads * slots * head_dim) * sizeof(float));
    return 0;
}

static int lora(int argc, char **argv) {
    if (argc != 13) return fprintf(stderr, "lora: wrong arguments\n"), 1;
    const int64_t rows = arg(argv, 2), in = arg(argv, 3), out = arg(argv, 4), rank = arg(argv, 5);
    float *y = read_file(argv[8]);
    hearth_lora_term table[LORA_TARGETS] = {{read_file(argv[9]), read_file(argv[10]), rank, in, out}};
    const int64_t *group_rows = read_file(argv[11]);
    int64_t count = 0;  /* the rows file holds the group's rows, -1 ends it */
    while (count < rows && group_rows[count] >= 0) count++;
    const hearth_lora_group group = {table, group_rows, count};
    const hearth_lora_site site = {0, 0};
    const int status = hearth_lora_add(read_file(argv[7]), in, in, y, out, &group, 1, 0, &site, 1, (int)arg(argv, 6));
    if (status) return fprintf(stderr, "lora returned %d\n", status), 1;
    write_file(argv[12], y, (size_t)(rows * out) * sizeof(float));
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) return fprintf(stderr, "usage: native_harness KERNEL ...\n"), 1;
    if (!strncmp(argv[1], "linear_", 7)) return linear(argc, argv);
    if (!strcmp(argv[1], "attention")) return attention(argc, argv);
    if (!strcmp(argv[1], "rope")) return rope(argc, argv);
    if (!strcmp(argv[1], "lora")) return lora(argc, argv);
    if (!strcmp(argv[1], "rms_norm") && argc == 9) {
        const int64_t rows = arg(argv, 2), dim = arg(argv, 3);
        float *y = malloc((size_t)(rows * dim) * sizeof(float));
        if (hearth_rms_norm(read_file(argv[6]), dim, read_file(argv[7]), y, rows, dim, strtof(argv[4], NULL),
                            (int)arg(argv, 5))) return fprintf(stderr, "rms_norm failed\n"), 1;
        write_file(argv[8], y, (size_t)(rows * dim) * sizeof(float));
        return 0;
    }
    if (!strcmp(argv[1], "silu_mul") && argc == 7) {
        const int64_t rows = arg(argv, 2), ffn = arg(argv, 3);
        float *out = malloc((size_t)(rows * ffn) * sizeof(float));
        hearth_silu_mul(read_file(argv[5]), out, rows, ffn, (int)arg(argv, 4));
        write_file(argv[6], out, (size_t)(rows * ffn) * sizeof(float));
        return 0;
    }
    fprintf(stderr, "unknown kernel or wrong arguments: %s\n", argv[1]);
    return 1;
}
