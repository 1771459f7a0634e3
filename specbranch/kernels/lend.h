/* Lending a waiting worker's core to the other worker's kernels (lend.c). */
#pragma once
#include <stdint.h>

/* One job: run items [begin, end) (a chunk); items must be independent and their results must not depend on
 * which thread ran them. */
typedef void (*lend_fn)(void *ctx, int64_t begin, int64_t end);

/* Run items 0..n-1 in chunks on the calling thread (and its OpenMP team) plus the lent core's helper, if one is
 * active; returns 0 without running anything if none is (the caller then runs its own loop). */
int lend_for(int64_t n, int64_t chunk, lend_fn fn, void *ctx);
