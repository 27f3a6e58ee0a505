"""The inline PTX of the W4A16 kernels: templates with @NAME@ placeholders, rendered once per
activation dtype by `render`, which refuses a template with a placeholder left unfilled.

Why PTX. A word's eight 4-bit codes become half-precision numbers two at a time: OR-ing a nibble
pair masked by 0x000F000F into the bits of (MAGIC, MAGIC) gives (MAGIC + q, MAGIC + q') in one LOP3
(as Marlin and FasterTransformer do), and one HFMA2 with -(MAGIC + z) leaves the exact pair
(q - z, q' - z). Triton cannot express a packed-half result, so these run as inline PTX on the GPU;
the CPU interpreter runs each kernel's portable fp32 form instead.

MAGIC is 1024.0 in fp16 and 128.0 in bf16: one unit in the last place is 1, so MAGIC + q is exact
for q < 1024 (fp16) or q < 128 (bf16).
"""

from __future__ import annotations

import re

import triton.language as tl

_PLACEHOLDER = re.compile(r"@[A-Z0-9_]+@")

# Words of the two activation dtypes: the bits of (MAGIC, MAGIC), of (1, 1), the packed type.
FP16_WORDS = {"MAGIC2": "0x64006400", "ONE2": "0x3C003C00", "TYPE": "f16x2"}
BF16_WORDS = {"MAGIC2": "0x43004300", "ONE2": "0x3F803F80", "TYPE": "bf16x2"}
CODE_PAIRS = ["c0", "c1", "c2", "c3"]


class PtxTemplateError(ValueError):
    """A PTX template rendered with a placeholder unfilled, or filled with a word it does not use."""


def render(template: str, words: dict[str, str]) -> tl.constexpr:
    """The template with every @KEY@ replaced by words[KEY], as a constexpr for inline_asm."""
    used = set(m[1:-1] for m in _PLACEHOLDER.findall(template))
    unused = set(words) - used
    if unused:
        raise PtxTemplateError(f"words {sorted(unused)} fill no placeholder of the template")
    for key, value in words.items():
        template = template.replace(f"@{key}@", value)
    left = _PLACEHOLDER.findall(template)
    if left:
        raise PtxTemplateError(f"placeholders {sorted(set(left))} left unfilled")
    return tl.constexpr(template)


def split_word_ptx(word: str, magic2: str = "@MAGIC2@") -> str:
    """PTX that splits the 32-bit word `word` into four half2 code pairs c0..c3 (declared by the
    caller): c_j = (MAGIC + q_j, MAGIC + q_j+4), magic2 the bits of (MAGIC, MAGIC); three shifts and
    four LOP3 per word."""
    return f"""shr.u32 s1, {word}, 4;
shr.u32 s2, {word}, 8;
shr.u32 s3, {word}, 12;
lop3.b32 c0, {word}, 0x000F000F, {magic2}, 0xEA;
lop3.b32 c1, s1, 0x000F000F, {magic2}, 0xEA;
lop3.b32 c2, s2, 0x000F000F, {magic2}, 0xEA;
lop3.b32 c3, s3, 0x000F000F, {magic2}, 0xEA;
"""


def pairs_fma_ptx(dst: list[str], src: list[str], mul: str, addends: list[str], type_: str = "@TYPE@") -> str:
    """PTX: dst[j] = src[j] * mul + addends[j % len(addends)] for the four code pairs of a word."""
    return "".join(f"fma.rn.{type_} {d}, {x}, {mul}, {addends[j % len(addends)]};\n"
                   for j, (d, x) in enumerate(zip(dst, src)))


def half2_sum_ptx(dst: str, pair: str, halves: str = "lo, hi", floats: str = "flo, fhi") -> str:
    """PTX: the f32 dst = the sum of the two fp16 halves of `pair` (the caller declares the .f16
    registers `halves` and the .f32 registers `floats`)."""
    h0, h1 = halves.split(", ")
    f0, f1 = floats.split(", ")
    return (f"mov.b32 {{{h0}, {h1}}}, {pair};\ncvt.f32.f16 {f0}, {h0};\ncvt.f32.f16 {f1}, {h1};\n"
            f"add.f32 {dst}, {f0}, {f1};\n")


# Checkpoint-layout GEMV (HALF2, fp16 x, one group per tile): per word the pairs become the exact
# (q - z) / 16 in [-1, 1] (one HFMA2 with 1/16 and -(64 + z/16)), four more HFMA2 multiply them by
# the matching pairs of x and add, and the two halves leave as one fp32 sum. Eight products of a
# word are rounded to fp16 and summed four at a time (each partial sum within 4 |x|), fp32 between
# words: about 30% fewer instructions than the fp32 form (docs/benchmarks.md).
WORD_DOT_FP16 = render("""{
.reg .b32 s1, s2, s3, c0, c1, c2, c3, k, acc;
.reg .f16 lo, hi;
.reg .f32 flo, fhi;
mov.b32 k, 0x2C002C00;
""" + split_word_ptx("$1", "0x64006400") + pairs_fma_ptx(CODE_PAIRS, CODE_PAIRS, "k", ["$2"], "f16x2") + """\
mul.rn.f16x2 acc, c0, $3;
fma.rn.f16x2 acc, c1, $4, acc;
fma.rn.f16x2 acc, c2, $5, acc;
fma.rn.f16x2 acc, c3, $6, acc;
""" + half2_sum_ptx("$0", "acc") + "}", {})

# Checkpoint-layout GEMM (PAIRS): the exact q - z of a word's eight codes, as eight 16-bit values.
_NIBBLES_TO_HALF = """{
.reg .b32 s1, s2, s3, c0, c1, c2, c3, one;
mov.b32 one, @ONE2@;
""" + split_word_ptx("$8") + pairs_fma_ptx(CODE_PAIRS, CODE_PAIRS, "one", ["$9"]) + """\
mov.b32 {$0, $4}, c0;
mov.b32 {$1, $5}, c1;
mov.b32 {$2, $6}, c2;
mov.b32 {$3, $7}, c3;
}"""
NIBBLES_TO_FP16 = render(_NIBBLES_TO_HALF, FP16_WORDS)
NIBBLES_TO_BF16 = render(_NIBBLES_TO_HALF, BF16_WORDS)

# Fragment layout (frag_tiles.py): the exact q - z of each code pair. Pairs 0 and 2 belong to row
# lr of the slab, 1 and 3 to row lr + 8 (two zero points per word); the pairs leave as the 32-bit
# registers the dot takes.
_FRAG_PAIRS = """{
.reg .b32 s1, s2, s3, c0, c1, c2, c3, one;
mov.b32 one, @ONE2@;
""" + split_word_ptx("$4") + pairs_fma_ptx(["$0", "$1", "$2", "$3"], CODE_PAIRS, "one", ["$5", "$6"]) + "}"
# SCALED: then times the rows' scales, one rounding (the weight as a dequantize-then-multiply GEMM
# sees it), so the dot accumulates in place and its result is not waited for inside the step.
_FRAG_SCALED = _FRAG_PAIRS[:-1] + """mul.rn.@TYPE@ $0, $0, $7;
mul.rn.@TYPE@ $1, $1, $8;
mul.rn.@TYPE@ $2, $2, $7;
mul.rn.@TYPE@ $3, $3, $8;
}"""
FRAG_PAIRS_FP16 = render(_FRAG_PAIRS, FP16_WORDS)
FRAG_PAIRS_BF16 = render(_FRAG_PAIRS, BF16_WORDS)
FRAG_SCALED_FP16 = render(_FRAG_SCALED, FP16_WORDS)
FRAG_SCALED_BF16 = render(_FRAG_SCALED, BF16_WORDS)

# Fragment-layout GEMV, fp16 x, two words of a thread (same rows, K 16 apart): the pairs as
# (q - z) / 16 (one HFMA2 with 1/16 and -(64 + z/16), exact) times the matching pairs of x,
# (x[k], x[k+1]) and (x[k+8], x[k+9]); per row, the four products of each half summed in fp16, the
# halves in fp32. Rows lr and lr + 8: two results.
FRAG_DOT_FP16 = render("""{
.reg .b32 s1, s2, s3, c0, c1, c2, c3, d0, d1, d2, d3, k, lo, hi;
.reg .f16 a, b;
.reg .f32 fa, fb;
mov.b32 k, 0x2C002C00;
""" + split_word_ptx("$2", "0x64006400")
    + pairs_fma_ptx(["d0", "d1", "d2", "d3"], CODE_PAIRS, "k", ["$4", "$5"], "f16x2")
    + split_word_ptx("$3", "0x64006400") + pairs_fma_ptx(CODE_PAIRS, CODE_PAIRS, "k", ["$4", "$5"], "f16x2") + """\
mul.rn.f16x2 lo, d0, $6;
fma.rn.f16x2 lo, d2, $7, lo;
fma.rn.f16x2 lo, c0, $8, lo;
fma.rn.f16x2 lo, c2, $9, lo;
mul.rn.f16x2 hi, d1, $6;
fma.rn.f16x2 hi, d3, $7, hi;
fma.rn.f16x2 hi, c1, $8, hi;
fma.rn.f16x2 hi, c3, $9, hi;
""" + half2_sum_ptx("$0", "lo", "a, b", "fa, fb") + half2_sum_ptx("$1", "hi", "a, b", "fa, fb") + "}", {})
