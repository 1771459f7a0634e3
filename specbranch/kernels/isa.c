/* Which instruction set the int8 and int4 kernels (q8.c, q4.c) run: chosen once at run time from the CPU, so
 * one library serves AVX2 machines and AVX-512 VNNI ones alike; tests pin AVX2 to compare the two codes
 * on one machine. (An earlier VNNI code for the int4 kernel, over row-major weights with 256-bit dpbusd,
 * measured no faster on an Intel CPU whose 256-bit dpbusd is slow; the present one uses 512-bit dpbusd
 * over the blocked layout.)
 *
 * Why VNNI matters: its dpbusd multiplies u8 by s8 and adds each 4 products straight into 32 bits,
 * one instruction where AVX2 needs three (maddubs to 16 bits, madd to 32, add). Both sums are exact,
 * so both codes give the same bits.
 */
static int vnni = -1; /* 1: AVX-512 VNNI, 0: AVX2, -1: not decided yet */

static int cpu_has_vnni(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

/* want = 1 takes AVX-512 VNNI where the CPU has it, 0 forces AVX2. Returns the code now in use (1 VNNI, 0 AVX2). */
int kernels_select_isa(int want) {
    vnni = want && cpu_has_vnni();
    return vnni;
}

/* The code in use (the best the CPU has, unless chosen otherwise). */
int kernels_vnni(void) {
    if (vnni < 0) kernels_select_isa(1);
    return vnni;
}
