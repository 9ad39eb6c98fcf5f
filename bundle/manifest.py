"""manifest.json: what a bundle is, written by the host, checked by the device before loading.

A bundle is a folder:
    manifest.json        this record (schema below), written last
    model.onnx           the graph (+ model.onnx.data when weights are external)
    tokenizer/           tokenizer files and chat_template.jinja (language models)
    report.md            the human-readable convert report
    engines/             TensorRT engines built on the device (not hashed: device-local)

Every file except manifest.json and engines/ is listed in `files` with its SHA-256 and size, so
a modified, truncated or missing file is found before anything is loaded.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bundle import __version__
from bundle.errors import ToolkitError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
UNHASHED_DIRS = ("engines",)  # device-local artefacts, rebuilt per device


BlockHook = Callable[[str, bytes], None]  # (relative path, block) for each block hashed


def sha256_file(path: Path, chunk: int = 1 << 20, on_block: Callable[[bytes], None] | None = None) -> str:
    """Hex SHA-256 of a file, read in blocks of `chunk` bytes from offset 0; `on_block` sees each
    block (the deploy computes its per-chunk CRC32s in the same pass)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            if on_block is not None:
                on_block(block)
    return h.hexdigest()


@dataclass
class FileEntry:
    sha256: str
    bytes: int


@dataclass
class Manifest:
    """The bundle record. Nested records stay plain dicts so that later issues can add fields
    without a schema bump; the top-level keys are the contract and are all required."""

    kind: str  # "decoder" | "encoder" | "generic"
    source: dict[str, Any]  # {kind, name, path, sha256, ...}
    architecture: dict[str, Any]  # {model_type, spec, dims: {...}}
    contract: dict[str, Any]  # bundle.contract ... to_json()
    precision: str  # "fp32" | "fp16" | "int8" | "int4"
    target: dict[str, Any]  # {name, family, runtime, engine: {...}}
    max_seq: int
    batch: int
    model_file: str = "model.onnx"
    kv_cache: dict[str, Any] | None = None
    tokenizer: dict[str, Any] | None = None
    pooling: dict[str, Any] | None = None
    parity: dict[str, Any] | None = None
    quantization: dict[str, Any] | None = None
    plan: dict[str, Any] | None = None
    files: dict[str, FileEntry] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    toolkit_version: str = __version__
    created_at: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        data = dict(data)
        data["files"] = {k: FileEntry(**v) for k, v in data.get("files", {}).items()}
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def name(self) -> str:
        return str(self.source.get("name", "model"))


def hash_tree(root: Path, block: int = 1 << 20, on_block: BlockHook | None = None) -> dict[str, FileEntry]:
    """SHA-256 and size of every file under root except the manifest and device-local dirs."""
    entries: dict[str, FileEntry] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_dir() or rel == MANIFEST or rel.split("/")[0] in UNHASHED_DIRS:
            continue
        hook = (lambda data, rel=rel: on_block(rel, data)) if on_block is not None else None
        entries[rel] = FileEntry(sha256=sha256_file(path, block, hook), bytes=path.stat().st_size)
    return entries


def read_manifest(bundle: Path) -> Manifest:
    """Parse manifest.json; a missing, unreadable or newer-schema manifest is a ToolkitError."""
    path = Path(bundle) / MANIFEST
    if not path.is_file():
        raise ToolkitError(f"{bundle} is not a bundle: it has no {MANIFEST}",
                           hint="pass the folder `toolkit convert` wrote")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ToolkitError(f"{path} is not valid JSON: {e}", hint="re-run `toolkit convert`") from e
    if not isinstance(data, dict) or "schema_version" not in data:
        raise ToolkitError(f"{path} is not a toolkit manifest (no schema_version)")
    if int(data["schema_version"]) > SCHEMA_VERSION:
        raise ToolkitError(
            f"{path} has schema version {data['schema_version']}; this toolkit reads up to "
            f"{SCHEMA_VERSION}", hint="upgrade the toolkit on this machine")
    try:
        return Manifest.from_dict(data)
    except TypeError as e:
        raise ToolkitError(f"{path} is missing required fields: {e}") from e


def verify_files(bundle: Path, manifest: Manifest, block: int = 1 << 20,
                 on_block: BlockHook | None = None) -> list[str]:
    """Every problem with the bundle's files, as sentences; an empty list means intact."""
    bundle = Path(bundle)
    problems: list[str] = []
    actual = hash_tree(bundle, block, on_block)
    for rel, entry in manifest.files.items():
        got = actual.get(rel)
        if got is None:
            problems.append(f"{rel} is missing")
        elif got.bytes != entry.bytes:
            problems.append(f"{rel} has {got.bytes} bytes, the manifest says {entry.bytes}")
        elif got.sha256 != entry.sha256:
            problems.append(f"{rel} was modified (SHA-256 {got.sha256[:12]}…, "
                            f"manifest {entry.sha256[:12]}…)")
    for rel in sorted(set(actual) - set(manifest.files)):
        problems.append(f"{rel} is not listed in the manifest")
    return problems


def load_verified(bundle: Path) -> Manifest:
    """read_manifest + verify_files, raising one ToolkitError that lists every problem."""
    manifest = read_manifest(bundle)
    check_intact(bundle, manifest)
    return manifest


def check_intact(bundle: Path, manifest: Manifest, block: int = 1 << 20,
                 on_block: BlockHook | None = None) -> None:
    """verify_files for a manifest already read; one ToolkitError that lists every problem.
    `on_block` sees each block hashed (the deploy computes its chunk CRC32s in that pass)."""
    problems = verify_files(bundle, manifest, block, on_block)
    if problems:
        listed = "\n  - ".join(problems)
        raise ToolkitError(f"bundle {bundle} failed verification:\n  - {listed}",
                           hint="the bundle was changed after it was written; convert it again "
                                "or deploy a fresh copy")
