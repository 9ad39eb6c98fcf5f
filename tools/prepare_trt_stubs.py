"""Copy the installed tensorrt-stubs into a folder mypy can read: `python tools/prepare_trt_stubs.py DIR`.

Why a copy: tensorrt-stubs 10.13 installs `tensorrt/__init__.pyi` and `tensorrt_bindings/*.pyi`
straight into site-packages without a py.typed marker, so mypy ignores them there
("missing library stubs or py.typed marker"); and its generated tensorrt_bindings/tensorrt.pyi
does not parse (plugin methods have a parameter named `in`, a keyword; one signature puts a
parameter without a default after defaulted ones). This script copies the stub files, renames
`in` parameters to `in_`, gives a default to parameters that follow a defaulted one, drops the
`tensorrt_libs` import (a runtime-only package), and checks that every file now parses.
tools/check_trt.sh points MYPYPATH at the result.
"""

from __future__ import annotations

import ast
import re
import sys
from importlib import metadata
from pathlib import Path

DIST = "tensorrt-stubs"
PACKAGES = ("tensorrt", "tensorrt_bindings")

_IN_PARAM = re.compile(r"([(,]\s*)in(\s*:)")


def _fix_defaults(line: str) -> str:
    """`def f(a: X = None, b: int) -> R:` -> `def f(a: X = None, b: int = ...) -> R:`."""
    head, sep, rest = line.partition("(")
    args, close, tail = rest.rpartition(")")
    params, seen_default = [], False
    for p in args.split(", "):
        if "=" in p:
            seen_default = True
        elif seen_default and p.strip() and not p.strip().startswith(("*", "/")):
            p = f"{p} = ..."
        params.append(p)
    return head + sep + ", ".join(params) + close + tail


def fix_stub(text: str) -> str:
    out = []
    for line in text.splitlines():
        if line.strip() == "import tensorrt_libs as tensorrt_libs":
            continue
        if line.lstrip().startswith("def "):
            line = _IN_PARAM.sub(r"\1in_\2", line)
            try:
                ast.parse(line.strip() + " ...")
            except SyntaxError:
                line = _fix_defaults(line)
        out.append(line)
    return "\n".join(out) + "\n"


def stub_files() -> list[tuple[Path, str]]:
    """(installed path, path relative to site-packages) of every tensorrt stub file."""
    try:
        dist = metadata.distribution(DIST)
    except metadata.PackageNotFoundError:
        sys.exit(f"{DIST} is not installed: pip install --no-deps 'tensorrt-stubs==10.13.*'")
    files = [f for f in dist.files or [] if f.suffix == ".pyi" and f.parts[0] in PACKAGES]
    return [(Path(str(dist.locate_file(f))), str(f)) for f in files]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.splitlines()[0], file=sys.stderr)
        return 2
    out = Path(argv[0])
    for src, rel in stub_files():
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        text = fix_stub(src.read_text(encoding="utf-8"))
        try:
            ast.parse(text, filename=rel)
        except SyntaxError as e:
            print(f"{rel}:{e.lineno}: still does not parse after fixing: {e.msg}", file=sys.stderr)
            return 1
        dst.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
