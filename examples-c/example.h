/*
 * Helpers the example programs share: status checking, bf16 conversion, a
 * small deterministic random source and contiguous tensor descriptors.
 * Not part of the library's API.
 */
#ifndef SEERATTN_EXAMPLE_H
#define SEERATTN_EXAMPLE_H

#include "seerattn.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Exit 1 with the library's message when a call fails. */
#define CHECK(call)                                                                       \
    do {                                                                                  \
        SeerStatus status_ = (call);                                                      \
        if (status_ != SEER_OK) {                                                         \
            fprintf(stderr, "%s failed: %s: %s\n", #call, seer_status_name(status_),      \
                    seer_last_error_message());                                           \
            exit(1);                                                                      \
        }                                                                                 \
    } while (0)

/* Round-to-nearest-even float -> bf16 bits. */
static inline uint16_t to_bf16(float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    bits += 0x7FFFu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

static inline float from_bf16(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float x;
    memcpy(&x, &bits, sizeof x);
    return x;
}

/* xorshift64*, uniform in [-1, 1); `state` is the caller's seed and state. */
static inline float uniform(uint64_t *state) {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return (float)((*state * 2685821657736338717ull) >> 40) / (float)(1u << 23) - 1.0f;
}

/* A contiguous [tokens, heads, dim] descriptor. */
static inline SeerTensor tensor(void *data, SeerDType dtype, SeerDevice device, int64_t tokens, int64_t heads,
                                int64_t dim) {
    SeerTensor t;
    memset(&t, 0, sizeof t);
    t.data = data;
    t.dtype = (uint32_t)dtype;
    t.device = (uint32_t)device;
    t.shape[0] = tokens; t.shape[1] = heads; t.shape[2] = dim;
    t.strides[0] = heads * dim; t.strides[1] = dim; t.strides[2] = 1;
    return t;
}

#endif
