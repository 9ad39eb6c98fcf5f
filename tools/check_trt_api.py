"""Fail when Python code uses TensorRT API that was removed in 10.0 (tensorrt_jetson.md §8, 1).

    python tools/check_trt_api.py [PATH ...]     # default: every tracked or new .py file

Prints `file:line: name (use replacement)` per use and exits 1; exits 0 when there is none.
Only code counts: the files are tokenized, so strings and comments (this file's own table, a
test planting a bad line in a temporary file) never match. What matches:
  - the names execute_async_v2, max_workspace_size, set_binding_shape, binding_is_input,
    num_bindings, and any name starting with get_binding_ (get_binding_shape/dtype/index/name)
  - `.build_engine(`: the removed Builder method, called as an attribute. The toolkit's own
    device.runtime.trt_build.build_engine is therefore imported and called by its bare name.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tokenize
from pathlib import Path

REPLACEMENTS = {
    "execute_async_v2": "execute_async_v3 + set_tensor_address",
    "max_workspace_size": "set_memory_pool_limit(MemoryPoolType.WORKSPACE, n)",
    "set_binding_shape": "set_input_shape",
    "binding_is_input": "get_tensor_mode(name) == TensorIOMode.INPUT",
    "num_bindings": "num_io_tensors",
    "get_binding_": "get_tensor_name/get_tensor_shape/get_tensor_dtype/get_tensor_mode",
    "build_engine": "build_serialized_network + Runtime.deserialize_cuda_engine",
}
SKIP_DIRS = {".git", ".venv", "venv", "build", "dist", "__pycache__", ".mypy_cache"}


def find_uses(source: str) -> list[tuple[int, str]]:
    """(line, removed name) for every use in one file's code."""
    try:
        tokens = [t for t in tokenize.generate_tokens(io.StringIO(source).readline)
                  if t.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE)]
    except (tokenize.TokenError, SyntaxError):
        return []  # not valid Python: the linters report it
    uses = []
    for i, tok in enumerate(tokens):
        if tok.type != tokenize.NAME:
            continue
        name = tok.string
        if name.startswith("get_binding_"):
            uses.append((tok.start[0], "get_binding_"))
        elif name in REPLACEMENTS and name != "build_engine":
            uses.append((tok.start[0], name))
        elif name == "build_engine" and 0 < i < len(tokens) - 1 \
                and tokens[i - 1].string == "." and tokens[i + 1].string == "(":
            uses.append((tok.start[0], name))
    return uses


def python_files(root: Path) -> list[Path]:
    """Tracked and untracked-but-not-ignored .py files (git), or a walk when git is absent."""
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "*.py"], cwd=root,
                             capture_output=True, text=True, check=True).stdout
        return [root / line for line in out.splitlines() if (root / line).is_file()]
    except (OSError, subprocess.CalledProcessError):
        return [p for p in root.rglob("*.py") if not SKIP_DIRS & set(p.parts)]


def check(paths: list[Path]) -> list[str]:
    problems = []
    for path in paths:
        files = python_files(path) if path.is_dir() else [path]
        for f in sorted(files):
            source = f.read_text(encoding="utf-8", errors="replace")
            for line, name in find_uses(source):
                shown = name + "*" if name.endswith("_") else name
                problems.append(f"{f}:{line}: {shown} was removed in TensorRT 10 "
                                f"(use {REPLACEMENTS[name]})")
    return problems


def main(argv: list[str]) -> int:
    roots = [Path(a) for a in argv] or [Path(__file__).resolve().parent.parent]
    problems = check(roots)
    for p in problems:
        print(p)
    if problems:
        print(f"{len(problems)} use(s) of TensorRT API removed in 10.0", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
