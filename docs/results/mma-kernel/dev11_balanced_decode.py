"""Dev 11 (session 17): a cheaper decode for the mma kernel, timed against the package's.

old: the package's kernel at commit 35521af (byte q times 3 once a digit, a byte permute to an
fp16 subnormal pair, A restarted before digit 3). The two variants feed the mma the balanced
leading digits B_i = round(u / 3^(4-i)), u = sum_i code_i 3^(4-i) in [-121, 121], made with
fp16x2 arithmetic on subnormals (u 2^-24): a product rounds to the subnormal grid, i.e. to an
integer, and no tie occurs. B_0..B_2 are one mul each, rest = u - 9 B_2 = 3 code_3 + code_4 one
fma, code_3 = round(rest / 3) one mul, and rest itself is digit 4's operand; the epilogue takes
2^24 (D_i - 3 D_(i-1)) as before, with mu S instead of (mu - alpha) S.
  q: u from the format-2 byte q: 1024 + q by one permute, fma(1024 + q, 243/256, 52.53125) =
     1025 + floor(243 q / 256) exactly, and fma(that, 2^-24, -1146 2^-24) = u 2^-24.
  v: u from a plain base-3 byte v = u + 121 (not the stored format: the run converts the bytes):
     one permute to v 2^-24 and one fma.
Run from the repository root on a GPU, at 35521af (the source it patches):
    PYTHONPATH=$PWD python3 docs/results/mma-kernel/dev11_balanced_decode.py
It writes $OUT/dev11.json (runs/20-balanced-decode.json)."""
import os
import sys

import torch

sys.path[:0] = [os.getcwd(), os.path.join(os.getcwd(), "benchmarks"), os.path.dirname(os.path.abspath(__file__))]
from dev_variants import Variant, run  # noqa: E402

from pt2llm.kernels import cuda_ternary as ct  # noqa: E402

BASE = ct._SRC
HELPERS = r'''__device__ __forceinline__ u32 hmul2(u32 a, u32 b) {
  u32 d; asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b)); return d;
}
__device__ __forceinline__ u32 hfma2(u32 a, u32 b, u32 c) {
  u32 d; asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c)); return d;
}
__device__ __forceinline__ u32 balanced(u32 w, u32 sel) {
#ifdef PLAIN_BYTES
  return hfma2(__byte_perm(w, 0, sel), 0x3C003C00u, 0x80798079u);              // v 2^-24 - 121 2^-24
#else
  const u32 t = hfma2(__byte_perm(w, 0x64646464u, sel), 0x3B983B98u, 0x52915291u);  // 1025 + v
  return hfma2(t, 0x00010001u, 0x847A847Au);                                    // (t - 1146) 2^-24
#endif
}
#ifdef PLAIN_BYTES
#define SEL_LO 0x4140
#define SEL_HI 0x4342
#else
#define SEL_LO 0x5140
#define SEL_HI 0x5342
#endif

// Thread-block clusters (sm_90)'''
LOOP = r'''      const u32 u[4] = {balanced(cur[s], SEL_LO), balanced(cur[8 + s], SEL_LO),
                        balanced(cur[s], SEL_HI), balanced(cur[8 + s], SEL_HI)};
      u32 lead[4], rest[4];
      #pragma unroll
      for (int i = 0; i < 5; ++i) {
        u32 a[4];
        #pragma unroll
        for (int r = 0; r < 4; ++r) {
          if (i < 3) {
            a[r] = lead[r] = hmul2(u[r], i == 0 ? 0x22522252u : (i == 1 ? 0x28BE28BEu : 0x2F1C2F1Cu));
            if (i == 2) rest[r] = hfma2(lead[r], 0xC880C880u, u[r]);
          } else {
            a[r] = i == 3 ? hmul2(rest[r], 0x35553555u) : rest[r];
          }
        }
        #pragma unroll
        for (int j = 0; j < NT; ++j) mma(d[i][j], a[0], a[1], a[2], a[3], bx[j][0], bx[j][1]);
      }
'''


def patched(plain: bool) -> str:
    s = BASE.replace("// Thread-block clusters (sm_90)", HELPERS, 1)
    lo = s.index("      u32 zA0 = __byte_perm(cur[s], 0, 0x4140)")
    hi = s.index("      #pragma unroll\n      for (int j = 0; j < NT; ++j) mma(sx[j]")
    s = s[:lo] + LOOP + s[hi:]
    old = "cA = h2f((u16)(pa >> 16)) - aA;"
    assert old in s
    s = s.replace(old, "cA = h2f((u16)(pa >> 16));").replace("cB = h2f((u16)(pb >> 16)) - aB;", "cB = h2f((u16)(pb >> 16));")
    return ("#define PLAIN_BYTES\n" if plain else "") + s


def plain_bytes(packed):
    """Format-2 bytes q -> plain base-3 bytes v = floor(243 q / 256) (what variant v reads)."""
    lut = ((243 * torch.arange(256, device=packed.device)) // 256).to(torch.uint8)
    return lut[packed.long()]


if __name__ == "__main__":
    run({"old": Variant(BASE), "q": Variant(patched(False)), "v": Variant(patched(True), bytes_map=plain_bytes)},
        "dev11.json", identical=False)
