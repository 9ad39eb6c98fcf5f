"""Activation ranges for static Q/DQ: run the fp32 graph over the calibration windows and record,
per tensor, the absolute value that the quantization scale will map to the largest code.

    ranges = collect_ranges(model, ["x_to_q_proj", ...], feeds, method="max", steps=steps)

The graph is run in ONNX Runtime with the tensors of interest added as extra outputs (on a
temporary copy next to the bundle being written, so a multi-GB model is never held twice).
Each window is one prefill step from an empty cache: the activations at positions 0..T-1 are the
ones a decode at those positions produces, so prefill windows cover decode as well.

Methods
  max          the largest |x| seen: nothing saturates, and a rare outlier coarsens every step
  percentile   the value below which `percentile`% of all |x| fall: a few outliers saturate
               (clipped to the largest code) in exchange for finer steps everywhere else
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from bundle.contract import SPARE_TOKEN
from bundle.progress import QUIET, Steps

METHODS = ("max", "percentile")
DEFAULT_PERCENTILE = 99.99


@dataclass(frozen=True)
class Range:
    amax: float  # the |x| that maps to the largest code
    observed_max: float  # the largest |x| seen, for the report (equal to amax for "max")
    channels: np.ndarray | None = None  # float32 [C]: max |x| per last-axis channel (smoothing)


def collect_ranges(model: onnx.ModelProto, tensors: list[str], feeds: Iterable[dict[str, np.ndarray]],
                   work_dir: Path, method: str = "max", percentile: float = DEFAULT_PERCENTILE,
                   samples: int = 0, steps: Steps = QUIET, threads: int | None = None) -> dict[str, Range]:
    """Range per tensor over all feeds. `samples` only sizes the progress display."""
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}")
    tops: dict[str, list[np.ndarray]] = {t: [] for t in tensors}
    maxima = dict.fromkeys(tensors, 0.0)
    counts = dict.fromkeys(tensors, 0)
    channels: dict[str, np.ndarray] = {}
    for i, outs in enumerate(_run(model, tensors, feeds, work_dir, threads)):
        for name, value in zip(tensors, outs):
            a = np.abs(value.astype(np.float32, copy=False))
            per_channel = a.reshape(-1, a.shape[-1]).max(axis=0)  # [C]
            channels[name] = np.maximum(channels.get(name, per_channel), per_channel)
            maxima[name] = max(maxima[name], float(per_channel.max(initial=0.0)))
            counts[name] += a.size
            if method == "percentile":
                tops[name].append(_top(a.ravel(), percentile))
        _progress(steps, i + 1, samples)
    ranges = {}
    for name in tensors:
        amax = maxima[name]
        if method == "percentile" and counts[name]:
            amax = _kth_largest(tops[name], _tail(counts[name], percentile)) or amax
        ranges[name] = Range(float(amax), maxima[name], channels.get(name))
    return ranges


@dataclass(frozen=True)
class Rows:
    """Calibration activations of one tensor, for searches that need the values themselves."""

    sample: np.ndarray  # float32 [n, C]: up to `rows` token rows, drawn evenly from every window
    mean_abs: np.ndarray  # float32 [C]: mean |x| per channel over every token seen
    mean_sq: np.ndarray  # float32 [C]: mean x^2 per channel over every token seen


def collect_rows(model: onnx.ModelProto, tensors: list[str], feeds: Iterable[dict[str, np.ndarray]],
                 work_dir: Path, rows: int, samples: int, steps: Steps = QUIET,
                 threads: int | None = None, seed: int = 0) -> dict[str, Rows]:
    """Per tensor: a random sample of about `rows` token rows (rows / samples from each of the
    `samples` feeds, so one window cannot dominate), and the mean |x| and mean x^2 per channel
    over every token."""
    rng = np.random.default_rng(seed)
    per_feed = max(1, -(-rows // max(1, samples)))
    kept: dict[str, list[np.ndarray]] = {t: [] for t in tensors}
    sums: dict[str, np.ndarray] = {}
    squares: dict[str, np.ndarray] = {}
    count = 0
    for i, outs in enumerate(_run(model, tensors, feeds, work_dir, threads)):
        pick: np.ndarray | None = None
        for name, value in zip(tensors, outs):
            x = value.reshape(-1, value.shape[-1]).astype(np.float32, copy=False)
            if pick is None:
                pick = rng.choice(len(x), min(per_feed, len(x)), replace=False)
                count += len(x)
            kept[name].append(x[pick])
            sums[name] = sums.get(name, 0.0) + np.abs(x).sum(axis=0, dtype=np.float64)
            squares[name] = squares.get(name, 0.0) + np.square(x, dtype=np.float64).sum(axis=0)
        _progress(steps, i + 1, samples)
    n = max(count, 1)
    return {t: Rows(np.concatenate(kept[t]), (sums[t] / n).astype(np.float32),
                    (squares[t] / n).astype(np.float32)) for t in tensors if kept[t]}


def _tail(n: int, percentile: float) -> int:
    """How many of n values lie above the percentile (at least 1)."""
    return max(1, math.ceil(n * (1.0 - percentile / 100.0)))


def _top(a: np.ndarray, percentile: float) -> np.ndarray:
    """The largest values of one sample that can still be among the overall tail: the overall
    k-th largest is always inside the union of each sample's k largest."""
    k = min(a.size, _tail(a.size, percentile) + 1)
    return np.partition(a, a.size - k)[a.size - k:]


def _kth_largest(parts: list[np.ndarray], k: int) -> float:
    allv = np.concatenate(parts)
    k = min(k, allv.size)
    return float(np.partition(allv, allv.size - k)[allv.size - k])


def _run(model: onnx.ModelProto, tensors: list[str], feeds: Iterable[dict[str, np.ndarray]],
         work_dir: Path, threads: int | None) -> Iterator[list[np.ndarray]]:
    """Yield the requested tensors for each feed dict."""
    from device.runtime.ort_backend import open_session

    n_out = len(model.graph.output)
    existing = {o.name for o in model.graph.output}
    for name in tensors:
        if name not in existing:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    try:
        with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
            path = Path(tmp) / "probe.onnx"
            onnx.save_model(model, str(path), save_as_external_data=True,
                            all_tensors_to_one_file=True, location="probe.onnx.data",
                            size_threshold=1024)
            # save_model moved every initializer's bytes into the temporary file: read them back
            # now, while it exists, so the caller's model is whole again afterwards
            onnx.external_data_helper.load_external_data_for_model(model, tmp)
            session = open_session(path, threads)
            for feed in feeds:
                yield session.run(tensors, feed)
            del session
    finally:
        del model.graph.output[n_out:]


def session_with_inputs(model: onnx.ModelProto, weights: list[str], tmp: Path,
                        threads: int | None) -> Callable[[str, dict[str, np.ndarray],
                                                          dict[str, np.ndarray]], np.ndarray]:
    """An ONNX Runtime session on `model` in which the initializers `weights` are graph inputs
    too, so a run may override any of them: run(output, feed, overrides) -> that output. The
    graph is saved under `tmp` (which must outlive the session) and `model` is left as it was."""
    import onnxruntime as ort

    from device.runtime.ort_backend import providers, session_options

    n_in = len(model.graph.input)
    inits = {t.name: t for t in model.graph.initializer}
    model.graph.input.extend(onnx.helper.make_tensor_value_info(w, inits[w].data_type,
                                                                list(inits[w].dims))
                             for w in weights)
    try:
        path = tmp / "probe.onnx"
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="probe.onnx.data", size_threshold=1024)
        onnx.external_data_helper.load_external_data_for_model(model, str(tmp))  # as in _run
    finally:
        del model.graph.input[n_in:]
    options = session_options(threads)
    options.log_severity_level = 3  # not one "initializer appears in graph inputs" line per weight
    session = ort.InferenceSession(str(path), options, providers=providers("cpu"))

    def run(output: str, feed: dict[str, np.ndarray], overrides: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(session.run([output], {**feed, **overrides})[0])

    return run


def _progress(steps: Steps, i: int, total: int) -> None:
    if total and (i == total or i % max(1, total // 4) == 0):
        steps.say(f"    calibration {i}/{total} samples")


def decoder_feeds(model: onnx.ModelProto, windows: list[list[int]]) -> Iterator[dict[str, np.ndarray]]:
    """One prefill from an empty cache per window, under the static-kv-v1 contract (the cache
    inputs take their static shape and dtype from the graph)."""
    names = {i.name for i in model.graph.input}
    caches = {}
    for i in model.graph.input:
        if i.name.startswith("past_"):
            dims = [1] + [d.dim_value for d in i.type.tensor_type.shape.dim[1:]]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
            caches[i.name] = np.zeros(dims, dtype)
    for ids in windows:
        T = len(ids)
        feed = {"input_ids": np.asarray([ids], np.int64),
                "position_ids": np.arange(T, dtype=np.int64)[None],
                "logits_index": np.arange(T, dtype=np.int64), SPARE_TOKEN: np.array(0, np.int32),
                **caches}
        yield {k: v for k, v in feed.items() if k in names}


def encoder_feeds(model: onnx.ModelProto, windows: list[list[int]]) -> Iterator[dict[str, np.ndarray]]:
    names = {i.name for i in model.graph.input}
    for ids in windows:
        feed = {"input_ids": np.asarray([ids], np.int64),
                "attention_mask": np.ones((1, len(ids)), np.int64),
                "token_type_ids": np.zeros((1, len(ids)), np.int64)}
        yield {k: v for k, v in feed.items() if k in names}
