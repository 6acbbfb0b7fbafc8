/* Fuzzing harness helpers for program-mode guests (guest ABI v1):
   SNAPSHOT marks the reset point and returns each run's input, DONE ends a
   run, COVERAGE_MAP names the 64 KiB map the VMM reads after every run.
   EDGE(id) records an AFL-style edge (previous block ^ this block). */
#ifndef FUZZ_H
#define FUZZ_H
#include "guest.h"

static u8 *fz_map __attribute__((unused));
static u64 fz_prev __attribute__((unused));

static inline void fz_init(void) { fz_map = (u8 *)hc(HC_COVERAGE_MAP, 0, 0, 0); }
static inline u64 fz_snapshot(u8 *buf, u64 cap) { return (u64)hc(HC_SNAPSHOT, (u64)buf, cap, 0); }
static inline void fz_done(u64 status) { hc(HC_DONE, status, 0, 0); }
#define EDGE(id) do { u64 fz_cur = (id); fz_map[(fz_cur ^ fz_prev) & 0xffff]++; fz_prev = fz_cur >> 1; } while (0)
static inline u64 fz_rdtsc(void) { u32 lo, hi; asm volatile("rdtsc" : "=a"(lo), "=d"(hi)); return ((u64)hi << 32) | lo; }
#endif
