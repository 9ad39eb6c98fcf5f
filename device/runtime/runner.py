"""Load a bundle on the device: verify it, then build the backend and tokenizer once.

    runner = load_bundle(path, slots=4)        # refuses a modified or mismatched bundle
    for tok in runner.generate_ids(runner.tokenizer.encode("Hi"), 16): ...

Order matters: the manifest and every file hash are checked, and the bundle's target is
compared with this device, *before* any model byte is handed to a runtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bundle.contract import DECODER_CONTRACT, ENCODER_CONTRACT
from bundle.errors import ToolkitError
from bundle.manifest import Manifest, load_verified
from device.runtime.backend import DecoderBackend, EncoderBackend
from device.runtime.threads import env_threads
from device.runtime.tokenizer import BundleTokenizer

TEGRA_RELEASE = Path("/etc/nv_tegra_release")


def device_family() -> str:
    """"jetson" on a Jetson (L4T writes /etc/nv_tegra_release), else "cpu"."""
    return "jetson" if TEGRA_RELEASE.exists() else "cpu"


def check_target(manifest: Manifest, family: str | None = None) -> None:
    """A bundle for ONNX Runtime runs on any device; a TensorRT bundle needs a Jetson (or an
    explicitly TensorRT-capable host, which the TensorRT engine gate checks in detail)."""
    family = family or device_family()
    target = manifest.target
    if target.runtime == "tensorrt" and family != "jetson" and not _tensorrt_importable():
        raise ToolkitError(
            f"bundle is for {target.name} (TensorRT) but this device is a {family} without "
            "TensorRT", hint="convert the model again with --target cpu for this machine, or "
                             "deploy this bundle to the Jetson it was made for")
    if manifest.contract.name not in (DECODER_CONTRACT, ENCODER_CONTRACT):
        raise ToolkitError(f"bundle contract {manifest.contract.name!r} cannot be served",
                           hint="only decoder (static-kv-v1) and encoder bundles are served")


def _tensorrt_importable() -> bool:
    from device.runtime.engine_identity import _tensorrt_version

    return _tensorrt_version() is not None


@dataclass
class Runner:
    path: Path
    manifest: Manifest
    backend: Any  # DecoderBackend | EncoderBackend
    tokenizer: BundleTokenizer | None

    @property
    def is_decoder(self) -> bool:
        return self.manifest.kind == "decoder"

    @property
    def name(self) -> str:
        return self.manifest.name

    def close(self) -> None:
        self.backend.close()


def load_bundle(path: Path, slots: int | None = None, threads: int | None = None,
                device: str = "cpu", rebuild_on_mismatch: bool = False,
                progress: Any = None, spin_between_runs: bool = True, ragged: bool = False) -> Runner:
    """spin_between_runs=False: ONNX Runtime's workers stop spinning when a step ends (a
    process with other threads to run between steps: the daemon; ort_backend.session_options).
    ragged: a decoder's steps may take rows of different lengths where the bundle and this
    ONNX Runtime allow it (the daemon's drafts, several slots; convert/ragged.py)."""
    path = Path(path)
    manifest = load_verified(path)  # hashes first: nothing unverified reaches a runtime
    check_target(manifest)
    threads = threads or env_threads()
    model = path / manifest.model_file
    tokenizer = (BundleTokenizer(path / manifest.tokenizer.path, manifest.tokenizer)
                 if manifest.tokenizer else None)
    backend: DecoderBackend | EncoderBackend
    if manifest.kind == "encoder":
        from device.runtime.ort_backend import OrtEncoderBackend

        backend = OrtEncoderBackend(model, threads=threads, device=device)
    elif manifest.target.runtime == "tensorrt":
        backend = _tensorrt_backend(path, manifest, slots or manifest.batch, rebuild_on_mismatch,
                                    progress)
    else:
        from device.runtime.ort_backend import OrtDecoderBackend

        slots = slots or manifest.batch
        backend = OrtDecoderBackend(model, manifest.kv_layout(), manifest.dims.vocab_size,
                                    slots=slots, threads=threads, device=device,
                                    spin_between_runs=spin_between_runs,
                                    ragged=ragged and slots > 1)  # one slot: rows never differ
    return Runner(path, manifest, backend, tokenizer)


def _tensorrt_backend(path: Path, manifest: Manifest, slots: int, rebuild: bool,
                      progress: Any) -> DecoderBackend:
    from device.runtime.engine_gate import prepare_engine
    from device.runtime.trt_backend import TrtDecoderBackend

    engine = prepare_engine(path, manifest, rebuild_on_mismatch=rebuild, progress=progress)
    return TrtDecoderBackend(engine, manifest.kv_layout(), manifest.dims.vocab_size, slots=slots)
