"""The source rewrite that turns a CUDA file into C++ the emulator headers compile.

Two constructs cannot be expressed with macros and are rewritten textually (line numbers are kept,
so compiler diagnostics and error messages point at the original file):

* launches ``kern<<<grid, block, shmem, stream>>>(args)`` become
  ``::gpt2gen_emu::launch(kern, "kern", ::gpt2gen_emu::LaunchCfg(grid, block, shmem, stream))(args)``.
  ``<<<`` is only recognised in code (not in comments, strings or ``operator<<<``), the closing
  ``>>>`` is the first one at bracket depth zero, and the kernel expression is the (qualified,
  possibly templated or parenthesised) name right before ``<<<``;
* ``__shared__`` declarations become per-block allocations:
  ``__shared__ float t[16][17];`` -> ``auto& t = ::gpt2gen_emu::shared_static<sarr_t<float,(16),(17)>, 0, SITE>("t", LINE);``
  (a bounds-checked array of the same size and layout), and ``extern __shared__ T s[];`` ->
  ``T* const s = ::gpt2gen_emu::dyn_shared<T>(ALIGN);``. At namespace scope the variable becomes a
  macro naming the same per-block storage. ``reinterpret_cast<...>(t)`` and ``(T*)t`` on a static
  shared array are redirected through ``::gpt2gen_emu::sdata(t)`` (its first element's address).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

REWRITE_VERSION = "3"


class RewriteError(Exception):
    """The source uses a construct the rewriter cannot translate (message names file and line)."""


_IDENT = re.compile(r"[A-Za-z_]\w*")


def mask_source(src: str) -> tuple[str, str]:
    """Return (code, stmt): ``src`` with comments and string/char literals blanked (newlines kept);
    ``stmt`` additionally blanks preprocessor directive lines."""
    n = len(src)
    code = list(src)
    directive = [False] * n
    i = 0
    at_line_start = True
    in_directive = False

    def blank(a: int, b: int) -> None:
        for k in range(a, b):
            if code[k] != "\n":
                code[k] = " "

    while i < n:
        c = src[i]
        if c == "\n":
            if not (i > 0 and src[i - 1] == "\\"):
                in_directive = False
            at_line_start = True
            i += 1
            continue
        if at_line_start and c == "#":
            in_directive = True
        if not c.isspace():
            at_line_start = False
        if in_directive:
            directive[i] = True
        if c == "/" and i + 1 < n and src[i + 1] == "/":
            j = src.find("\n", i)
            j = n if j < 0 else j
            blank(i, j)
            if in_directive:
                for k in range(i, j):
                    directive[k] = True
            i = j
            continue
        if c == "/" and i + 1 < n and src[i + 1] == "*":
            j = src.find("*/", i + 2)
            j = n if j < 0 else j + 2
            blank(i, j)
            if in_directive:
                for k in range(i, j):
                    directive[k] = True
            i = j
            continue
        if c == "R" and i + 1 < n and src[i + 1] == '"' and (i == 0 or not (src[i - 1].isalnum() or src[i - 1] == "_")):
            m = re.compile(r'R"([^()\\ ]{0,16})\(').match(src, i)
            if m:
                end = src.find(")" + m.group(1) + '"', m.end())
                end = n if end < 0 else end + len(m.group(1)) + 2
                blank(i, end)
                i = end
                continue
        if c == '"' or (c == "'" and not (i > 0 and src[i - 1].isalnum() and i + 1 < n and src[i + 1].isalnum()
                                          and _in_number(src, i))):
            j = i + 1
            while j < n and src[j] != c:
                if src[j] == "\\":
                    j += 1
                elif src[j] == "\n":
                    break
                j += 1
            j = min(j + 1, n)
            if not (c == '"' and in_directive and _is_include(src, i)):
                blank(i, j)
            if in_directive:
                for k in range(i, j):
                    directive[k] = True
            i = j
            continue
        i += 1
    code_s = "".join(code)
    stmt = "".join(" " if (directive[k] and code_s[k] != "\n") else code_s[k] for k in range(n))
    return code_s, stmt


def _in_number(src: str, i: int) -> bool:
    """Is the quote at i a C++14 digit separator (inside a numeric literal)?"""
    j = i - 1
    while j >= 0 and (src[j].isalnum() or src[j] in "'."):
        j -= 1
    return src[j + 1].isdigit()


def _is_include(src: str, i: int) -> bool:
    line_start = src.rfind("\n", 0, i) + 1
    return re.match(r"\s*#\s*include\s*$", src[line_start:i]) is not None


def _line_of(src: str, pos: int) -> int:
    return src.count("\n", 0, pos) + 1


def _match_forward(code: str, i: int, open_c: str, close_c: str) -> int:
    """Index of the bracket closing the one at i (code[i] == open_c)."""
    depth = 0
    for j in range(i, len(code)):
        if code[j] == open_c:
            depth += 1
        elif code[j] == close_c:
            depth -= 1
            if depth == 0:
                return j
    return -1


def _match_backward(code: str, i: int, open_c: str, close_c: str) -> int:
    """Index of the bracket opening the one at i (code[i] == close_c)."""
    depth = 0
    for j in range(i, -1, -1):
        if code[j] == close_c:
            depth += 1
        elif code[j] == open_c:
            depth -= 1
            if depth == 0:
                return j
    return -1


def _match_angle_backward(code: str, i: int) -> int:
    """Index of the '<' opening the template argument list closed at i, skipping (...) and [...]."""
    depth = 0
    j = i
    while j >= 0:
        ch = code[j]
        if ch in ")]":
            j = _match_backward(code, j, "(" if ch == ")" else "[", ch)
            if j < 0:
                return -1
        elif ch == ">":
            depth += 1
        elif ch == "<":
            depth -= 1
            if depth == 0:
                return j
        j -= 1
    return -1


@dataclass
class _Edit:
    start: int
    end: int
    text: str


@dataclass
class RewriteResult:
    text: str
    launches: int = 0
    shared: list[str] = field(default_factory=list)


def _kernel_start(code: str, i: int, fname: str, src: str) -> int:
    """Start of the kernel expression that ends right before position i (the ``<<<``)."""
    j = i - 1
    while j >= 0 and code[j].isspace():
        j -= 1
    if j >= 0 and code[j] == ")":
        k = _match_backward(code, j, "(", ")")
        if k < 0:
            raise RewriteError(f"{fname}:{_line_of(src, i)}: unbalanced parentheses before <<<")
        return k
    while True:
        if j >= 0 and code[j] == ">":
            k = _match_angle_backward(code, j)
            if k < 0:
                raise RewriteError(f"{fname}:{_line_of(src, i)}: unbalanced template arguments before <<<")
            j = k - 1
            while j >= 0 and code[j].isspace():
                j -= 1
        end = j
        while j >= 0 and (code[j].isalnum() or code[j] == "_"):
            j -= 1
        if j == end:
            raise RewriteError(f"{fname}:{_line_of(src, i)}: cannot find the kernel name before <<<")
        start = j + 1
        k = j
        while k >= 0 and code[k].isspace():
            k -= 1
        if k >= 1 and code[k] == ":" and code[k - 1] == ":":
            j = k - 2
            while j >= 0 and code[j].isspace():
                j -= 1
            if j < 0 or not (code[j].isalnum() or code[j] in "_>"):
                return k - 1  # leading ::name
            continue
        return start


def _rewrite_launches(src: str, code: str, fname: str, edits: list[_Edit]) -> int:
    count = 0
    pos = 0
    while True:
        i = code.find("<<<", pos)
        if i < 0:
            return count
        pos = i + 3
        before = code[:i].rstrip()
        if before.endswith("operator") or code.startswith("<", i + 3):
            continue
        # the closing >>> at depth zero
        depth = 0
        j = i + 3
        close = -1
        while j < len(code):
            ch = code[j]
            if ch in "([{":
                depth += 1
            elif ch in ")]}":
                depth -= 1
                if depth < 0:
                    break
            elif depth == 0 and code.startswith(">>>", j):
                close = j
                break
            j += 1
        if close < 0:
            raise RewriteError(f"{fname}:{_line_of(src, i)}: kernel launch <<< without a matching >>>")
        k = close + 3
        while k < len(code) and code[k].isspace():
            k += 1
        if k >= len(code) or code[k] != "(":
            raise RewriteError(f"{fname}:{_line_of(src, i)}: kernel launch >>> must be followed by (arguments)")
        start = _kernel_start(code, i, fname, src)
        name = " ".join(src[start:i].split())
        lit = name.replace("\\", "\\\\").replace('"', '\\"')
        edits.append(_Edit(start, start, "::gpt2gen_emu::launch("))
        edits.append(_Edit(i, i + 3, f', "{lit}", ::gpt2gen_emu::LaunchCfg('))
        edits.append(_Edit(close, close + 3, "))"))
        pos = close + 3
        count += 1


def _namespace_scopes(stmt: str, positions: list[int]) -> dict[int, bool]:
    """For each position: is it at namespace scope (every enclosing brace is a namespace/extern block)?"""
    result: dict[int, bool] = {}
    targets = sorted(positions)
    ti = 0
    stack: list[bool] = []  # True = namespace-like block
    last_boundary = 0
    for k, ch in enumerate(stmt):
        while ti < len(targets) and targets[ti] == k:
            result[targets[ti]] = all(stack)
            ti += 1
        if ch == "{":
            head = stmt[last_boundary:k]
            is_ns = re.fullmatch(r"\s*(inline\s+)?namespace\b[\w\s:]*", head) is not None or \
                re.fullmatch(r"\s*extern\s*", head) is not None
            stack.append(is_ns)
            last_boundary = k + 1
        elif ch == "}":
            if stack:
                stack.pop()
            last_boundary = k + 1
        elif ch == ";":
            last_boundary = k + 1
    while ti < len(targets):
        result[targets[ti]] = all(stack)
        ti += 1
    return result


def _split_top(text: str, sep: str = ",") -> list[str]:
    parts, depth, angle, cur = [], 0, 0, []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif depth == 0 and ch == "<":
            angle += 1
        elif depth == 0 and ch == ">" and angle:
            angle -= 1
        if ch == sep and depth == 0 and angle == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def _take_call(text: str, m: re.Match) -> tuple[str, str]:
    """For a match ending at an opening parenthesis: (argument text, text with the call removed)."""
    open_at = m.end() - 1
    close = _match_forward(text, open_at, "(", ")")
    if close < 0:
        return "", text
    return text[open_at + 1:close], text[:m.start()] + " " + text[close + 1:]


_ALIGN_RES = [
    re.compile(r"__align__\s*\("),
    re.compile(r"\balignas\s*\("),
]
_ATTR_RE = re.compile(r"__attribute__\s*\(")


def _parse_shared(decl: str, fname: str, line: int):
    """Parse the text of a __shared__ declaration (without the keyword and the ';')."""
    align = None
    text = decl
    for rx in _ALIGN_RES:
        while True:
            m = rx.search(text)
            if not m:
                break
            arg, text = _take_call(text, m)
            align = arg.strip()
    while True:
        m = _ATTR_RE.search(text)
        if not m:
            break
        arg, text = _take_call(text, m)
        am = re.search(r"aligned\s*\((.*)\)", arg)
        if am:
            align = am.group(1).strip()
    is_extern = re.search(r"\bextern\b", text) is not None
    text = re.sub(r"\b(extern|static)\b", " ", text)
    if _split_top(text, "=")[1:]:
        raise RewriteError(f"{fname}:{line}: __shared__ variables cannot have an initializer")
    decls = []
    base_type = None
    for idx, chunk in enumerate(_split_top(text, ",")):
        chunk = chunk.strip()
        dims: list[str] = []
        while chunk.endswith("]"):
            o = _match_backward(chunk, len(chunk) - 1, "[", "]")
            if o < 0:
                raise RewriteError(f"{fname}:{line}: unbalanced [ ] in __shared__ declaration")
            dims.insert(0, chunk[o + 1:-1].strip())
            chunk = chunk[:o].rstrip()
        m = re.search(r"([A-Za-z_]\w*)\s*$", chunk)
        if not m:
            raise RewriteError(f"{fname}:{line}: cannot parse __shared__ declaration '{decl.strip()}'")
        name = m.group(1)
        prefix = chunk[:m.start()].strip()
        if idx == 0:
            if not prefix:
                raise RewriteError(f"{fname}:{line}: __shared__ declaration without a type")
            base_type = prefix.rstrip("*& ").strip()
            typ = prefix
        else:
            typ = f"{base_type} {prefix}".strip()
        decls.append((" ".join(typ.split()), name, dims))
    return is_extern, align, decls


def rewrite_source(src: str, fname: str, site_counter: list[int] | None = None) -> RewriteResult:
    """Rewrite launches and __shared__ declarations of one file (see the module docstring)."""
    if site_counter is None:
        site_counter = [0]
    code, stmt = mask_source(src)
    edits: list[_Edit] = []
    launches = _rewrite_launches(src, code, fname, edits)

    matches = [m.start() for m in re.finditer(r"\b__shared__\b", stmt)]
    scopes = _namespace_scopes(stmt, matches)
    shared_arrays: list[tuple[str, int]] = []
    names: list[str] = []
    for pos in matches:
        b = max(stmt.rfind(";", 0, pos), stmt.rfind("{", 0, pos), stmt.rfind("}", 0, pos)) + 1
        while b < pos and stmt[b].isspace():
            b += 1
        # end: next ';' at depth zero
        depth, e = 0, -1
        for k in range(pos, len(stmt)):
            ch = stmt[k]
            if ch in "([{":
                depth += 1
            elif ch in ")]}":
                depth -= 1
            elif ch == ";" and depth == 0:
                e = k
                break
        line = _line_of(src, pos)
        if e < 0:
            raise RewriteError(f"{fname}:{line}: __shared__ declaration without ';'")
        decl = code[b:pos] + " " + code[pos + len("__shared__"):e]
        is_extern, align, decls = _parse_shared(decl, fname, line)
        al = f"({align})" if align else "0"
        at_ns = scopes.get(pos, False)
        pieces = []
        for typ, name, dims in decls:
            names.append(name)
            if is_extern:
                expr = f"::gpt2gen_emu::dyn_shared<{typ}>({al})"
                pieces.append(f"#define {name} ({expr})" if at_ns else f"{typ}* const {name} = {expr};")
            else:
                site_counter[0] += 1
                texpr = f"::gpt2gen_emu::sarr_t<{typ}, {', '.join(f'({d})' for d in dims)}>" if dims else typ
                expr = f'::gpt2gen_emu::shared_static<{texpr}, {al}, {site_counter[0]}>("{name}", {line})'
                pieces.append(f"#define {name} ({expr})" if at_ns else f"auto& {name} = {expr};")
                if dims:
                    shared_arrays.append((name, e + 1))
        newlines = src.count("\n", b, e + 1)
        if at_ns:
            end_line = line + src[pos:e + 1].count("\n")
            text = "\n" + "\n".join(pieces) + f"\n#line {end_line}\n"
        else:
            text = " ".join(pieces) + "\n" * newlines
        edits.append(_Edit(b, e + 1, text))

    # Casts of static shared arrays to pointers go through sdata() (the array is a class object).
    for name, after in shared_arrays:
        for rx in (re.compile(r"reinterpret_cast\s*<[^;()]*>\s*\(\s*(" + re.escape(name) + r")\s*\)"),
                   re.compile(r"\(\s*(?:const\s+|volatile\s+)*[\w:<>\s]+\*\s*\)\s*(" + re.escape(name) + r")\b(?!\s*[\[.(])")):
            for m in rx.finditer(code, after):
                edits.append(_Edit(m.start(1), m.end(1), f"::gpt2gen_emu::sdata({name})"))

    edits.sort(key=lambda ed: (ed.start, ed.end))
    for a, bb in zip(edits, edits[1:]):
        if bb.start < a.end:
            raise RewriteError(f"{fname}:{_line_of(src, bb.start)}: overlapping rewrites (launch inside a __shared__ declaration?)")
    out = src
    for ed in reversed(edits):
        out = out[:ed.start] + ed.text + out[ed.end:]
    return RewriteResult(out, launches, names)
