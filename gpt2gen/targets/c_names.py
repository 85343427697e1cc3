"""The names the C target reserves.

A config name becomes a C constant at file scope and a tensor or carry name a local variable of
gg_forward/gg_backward, so none may be a C keyword, a name of the headers the generated model.c includes,
or a name the generated code declares itself. The keywords and the headers' names are listed (they cannot
be read off anything in this repository; tests check the list against the machine's own headers); the
generated code's names are read off its templates, the ABI header and the kernel table, so a new kernel or
helper is reserved the moment it exists.
"""
from __future__ import annotations

import functools
import re

C_KEYWORDS = frozenset("""auto break case char const continue default do double else enum extern float for goto if
inline int long register restrict return short signed sizeof static struct switch typedef union unsigned void
volatile while _Alignas _Alignof _Atomic _Bool _Complex _Generic _Imaginary _Noreturn _Static_assert _Thread_local
alignas alignof bool constexpr false nullptr static_assert thread_local true typeof typeof_unqual asm main""".split())

_MATH_FUNCTIONS = """acos asin atan atan2 cos sin tan acosh asinh atanh cosh sinh tanh exp exp2 expm1 frexp ilogb ldexp
log log10 log1p log2 logb modf scalbn scalbln cbrt fabs hypot pow sqrt erf erfc lgamma tgamma ceil floor nearbyint rint
lrint llrint round lround llround trunc fmod remainder remquo copysign nan nextafter nexttoward fdim fmax fmin
fma""".split()

# ISO C11's names in the standard headers model.c includes (it is compiled with -std=c11, where glibc adds
# only the POSIX rand_r and strtok_r, and immintrin.h's mm_malloc.h posix_memalign). Every other name of the
# intrinsics headers starts with an underscore, and omp.h's with omp_ (see RESERVED_PREFIXES).
C_LIBRARY: dict[str, frozenset[str]] = {
    "math.h": frozenset([f + suffix for f in _MATH_FUNCTIONS for suffix in ("", "f", "l")] + """float_t double_t
        HUGE_VAL HUGE_VALF HUGE_VALL INFINITY NAN FP_INFINITE FP_NAN FP_NORMAL FP_SUBNORMAL FP_ZERO FP_FAST_FMA
        FP_FAST_FMAF FP_FAST_FMAL FP_ILOGB0 FP_ILOGBNAN MATH_ERRNO MATH_ERREXCEPT math_errhandling fpclassify
        isfinite isinf isnan isnormal signbit isgreater isgreaterequal isless islessequal islessgreater
        isunordered""".split()),
    "stddef.h": frozenset("ptrdiff_t size_t max_align_t wchar_t NULL offsetof".split()),
    "stdlib.h": frozenset("""size_t wchar_t div_t ldiv_t lldiv_t quot rem NULL EXIT_FAILURE EXIT_SUCCESS RAND_MAX
        MB_CUR_MAX atof atoi atol atoll strtod strtof strtold strtol strtoll strtoul strtoull rand srand rand_r
        aligned_alloc calloc free malloc realloc posix_memalign abort atexit at_quick_exit exit getenv quick_exit system bsearch
        qsort abs labs llabs div ldiv lldiv mblen mbtowc wctomb mbstowcs wcstombs""".split()),
    "string.h": frozenset("""size_t NULL memcpy memmove strcpy strncpy strcat strncat memcmp strcmp strcoll strncmp
        strxfrm memchr strchr strcspn strpbrk strrchr strspn strstr strtok strtok_r memset strerror
        strlen""".split()),
    # (bf16 storage's gg_bf16 is a uint16_t: util.c.j2)
    "stdint.h": frozenset([f"{u}int{k}{n}_t" for u in ("", "u") for k in ("", "_least", "_fast") for n in (8, 16, 32, 64)]
                          + [f"{u}INT{k}{n}_{m}" for k in ("", "_LEAST", "_FAST") for n in (8, 16, 32, 64)
                             for u, m in (("", "MIN"), ("", "MAX"), ("U", "MAX"))]
                          + [f"{u}INT{n}_C" for u in ("", "U") for n in (8, 16, 32, 64, "MAX")]
                          + """intptr_t uintptr_t intmax_t uintmax_t INTPTR_MIN INTPTR_MAX UINTPTR_MAX INTMAX_MIN
        INTMAX_MAX UINTMAX_MAX PTRDIFF_MIN PTRDIFF_MAX SIG_ATOMIC_MIN SIG_ATOMIC_MAX SIZE_MAX WCHAR_MIN WCHAR_MAX
        WINT_MIN WINT_MAX""".split()),
}

# Names the C target writes into the C itself (the batch maxima that size the arenas).
GENERATOR_NAMES = frozenset({"B", "T", "B_MAX", "T_MAX"})

# Prefixes the generated C reserves: gradients, helpers and macros, arena offsets and slots; OpenMP's API.
RESERVED_PREFIXES = ("d_", "gg_", "GG_", "OFF_", "DSLOT_", "omp_", "ompt_", "ompd_")

_C_TOKEN = re.compile(r"(?P<skip>//[^\n]*|/\*.*?\*/|\"(?:\\.|[^\"\\\n])*\"|'(?:\\.|[^'\\\n])*'|\.?\d(?:[eEpP][-+]|[\w.])*)"
                      r"|(?P<name>[A-Za-z_]\w*)|(?P<brace>[{}()])|(?P<member>->|\.)", re.S)
_JINJA = re.compile(r"\{#.*?#\}|\{\{.*?\}\}|\{%.*?%\}", re.S)
_DIRECTIVE = re.compile(r"^[ \t]*#[ \t]*(\w+)[ \t]*([A-Za-z_]\w*)?[^\n]*", re.M)


def c_names(source: str, file_scope_only: bool) -> set[str]:
    """The identifiers a C source (a template with its Jinja tags removed) declares or uses.

    ``file_scope_only``: only those outside every function body and parameter list -- a kernel's own
    locals and parameters may share a name with a config constant (the inner one shadows it), its
    functions, types, globals and macros may not. Macros count wherever they are defined; other
    directives (#include, #pragma) are dropped."""
    text = _JINJA.sub(" ", source)
    names: set[str] = set()

    def directive(m: re.Match) -> str:
        if m.group(1) in ("define", "ifdef", "ifndef", "undef") and m.group(2):
            names.add(m.group(2))
        return ""
    text = _DIRECTIVE.sub(directive, text)
    depth, parens, stack, last = 0, 0, [], ""
    for m in _C_TOKEN.finditer(text):
        if m.group("skip"):
            continue
        tok = m.group("name") or m.group("brace") or m.group("member")
        if tok == "{":
            stack.append(last != "extern")   # extern "C" { ... } opens no scope
            depth += stack[-1]
        elif tok == "}":
            depth -= stack.pop() if stack else 0
        elif tok == "(":
            parens += 1
        elif tok == ")":
            parens = max(parens - 1, 0)
        elif tok in ("->", "."):
            pass
        elif last in ("->", "."):
            pass                             # a struct member: its own namespace
        elif not file_scope_only or (depth == 0 and parens == 0):
            names.add(tok)
        last = tok
    return names


@functools.lru_cache(maxsize=None)
def generated_c_names() -> dict[str, str]:
    """Every name the generated C declares or uses for itself -> where it comes from.

    Read off the sources the C is made of: the whole-model templates (``model.*.j2``: everything in them,
    since that is the scope the model's own names are declared in), the kernel templates and the ABI
    header (their file-scope names), and the kernel table's calls."""
    from ..resources import csrc_dir, templates_dir
    from .cpu import KERNELS
    out: dict[str, str] = {}
    root = templates_dir()
    for path in sorted(root.rglob("*.j2")):
        whole = path.name.startswith("model.")
        for name in c_names(path.read_text(), file_scope_only=not whole):
            out.setdefault(name, f"a name of the generated C (templates/{path.relative_to(root).as_posix()})")
    for name in c_names((csrc_dir() / "gpt2gen_abi.h").read_text(), file_scope_only=True):
        out.setdefault(name, "a name of the generated C's ABI (gpt2gen/csrc/gpt2gen_abi.h)")
    for op, kernel in KERNELS.items():
        for call in (kernel.forward, kernel.backward):
            out[call.fn] = f"a kernel function of op `{op}`"
    return out


def reserved_reason(name: str) -> str | None:
    """Why ``name`` cannot be a C identifier of a model (a config, tensor or carry name), or None."""
    if name in C_KEYWORDS:
        return "a C keyword"
    if name.startswith("_"):
        return "C reserves names that start with an underscore (at file scope, where config names are declared)"
    for header, names in C_LIBRARY.items():
        if name in names:
            return f"declared by <{header}>, which the generated C includes"
    for prefix in RESERVED_PREFIXES:
        if name.startswith(prefix):
            owner = "OpenMP (omp.h)" if prefix.startswith("omp") else "the generated C"
            return f"the prefix `{prefix}` is reserved by {owner}"
    if name in GENERATOR_NAMES:
        return "a name of the generated C (the batch shape and its build-time maxima)"
    return generated_c_names().get(name)
