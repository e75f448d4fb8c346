/* The LoRA delta's tables (lora_delta.c), shared with the decoder loop (decoder_layers.c).
 * Include after `act_t` is defined. */
#ifndef HEARTH_LORA_H
#define HEARTH_LORA_H

#include <stdint.h>

enum { LORA_TARGETS = 7 };

/* One target of one layer of an adapter. */
typedef struct {
    const float *a;       /* [rank][in_features], or NULL: the adapter does not touch this target */
    const float *bt;      /* [rank][out_features], the adapter's scale folded in */
    int64_t rank, in_features, out_features;
} hearth_lora_term;

/* One adapter's rows in a step. */
typedef struct {
    const hearth_lora_term *table; /* [num_layers * LORA_TARGETS] */
    const int64_t *rows;           /* indices into the step's rows */
    int64_t num_rows;
} hearth_lora_group;

/* Where a matmul's targets' columns start: target index (0..6) and first column. */
typedef struct {
    int64_t target, first_column;
} hearth_lora_site;

int hearth_lora_add(const act_t *x, int64_t ldx, int64_t in_features, act_t *y, int64_t ldy,
                    const hearth_lora_group *groups, int64_t num_groups, int64_t layer,
                    const hearth_lora_site *sites, int64_t num_sites, int num_threads);

#endif
