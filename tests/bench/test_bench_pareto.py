"""bench/pareto.py: the Pareto front, the peer check, same-round ratios and the plot (no model)."""

from __future__ import annotations

from pathlib import Path

from bench.pareto import Point, dominated, paired_ratio, pareto, pareto_table, plot  # noqa: E402


def _points() -> list[Point]:
    return [Point("ours int4", "ours", 90, 27.0, [200.0, 100.0, 210.0]),
            Point("ours int8", "ours", 150, 26.8, [150.0, 80.0, 160.0]),
            Point("peer int4", "peer", 85, 35.0, [190.0, 95.0, 200.0]),  # smaller: on the front
            Point("peer q8", "peer", 260, 26.9, [155.0, 85.0, 150.0]),  # faster than ours int8 ...
            Point("peer missing", "peer", 10, None, [])]


def test_paired_ratio_is_the_median_of_same_round_ratios():
    # best-of would say 210/200 = 1.05; the rounds' own ratios are 2.0, 1.0, 0.5 -> median 1.0
    assert paired_ratio([200.0, 100.0, 50.0], [100.0, 100.0, 100.0]) == 1.0
    assert paired_ratio([], [1.0]) is None


def test_pareto_front_and_dominated_peers():
    pts = _points()
    # peer q8 is faster than ours int8 in two rounds of three (1.03x): on the front, less accurate
    assert [p.name for p in pareto(pts)] == ["peer int4", "ours int4", "ours int8", "peer q8"]
    assert dominated(pts) == []  # peer q8 is faster than ours int8 but less accurate
    pts.append(Point("peer fast", "peer", 300, 26.5, [170.0, 90.0, 170.0]))
    assert [(p.name, o.name) for p, o in dominated(pts)] == [("peer fast", "ours int8")]
    table = pareto_table(pts)
    assert "peer fast beats ours int8 (1.12x, ppl 26.500 < 26.800)" in table and "peer missing" in table


def test_faster_means_the_median_same_round_ratio():
    """A peer whose median round is faster (130 > 120 tok/s) but that lost two of the three
    rounds it shared with ours (ratios 1.3, 0.75, 0.92) is not faster: no point beats ours."""
    ours = Point("ours", "ours", 90, 27.0, [100.0, 200.0, 120.0])
    peer = Point("peer", "peer", 95, 26.5, [130.0, 150.0, 110.0])
    assert peer.speed is not None and ours.speed is not None and peer.speed > ours.speed
    assert dominated([ours, peer]) == []
    assert {p.name for p in pareto([ours, peer])} == {"ours", "peer"}
    faster = Point("peer", "peer", 95, 26.5, [130.0, 210.0, 110.0])  # 1.3, 1.05, 0.92 -> 1.05
    assert [(p.name, o.name) for p, o in dominated([ours, faster])] == [("peer", "ours")]


def test_plot_writes_a_png(tmp_path):
    out = plot(_points(), tmp_path / "q.png", "test")
    assert out is not None and out.read_bytes()[:4] == b"\x89PNG"


def test_tiny_decoder_corpus_and_training(tmp_path, monkeypatch):
    """bench/tiny_decoder.py: the never-4-bit decoder's corpus is fixed (calibration text first,
    never the gate's held-out text) and two steps write a Hugging Face folder with the config."""
    import json

    import torch
    import transformers

    from bench import tiny_decoder
    from quantize.calibration import builtin_text

    monkeypatch.setattr(tiny_decoder, "MODULES", ("textwrap", "no/such_module"))  # a short corpus
    text = tiny_decoder.corpus()
    assert text.startswith(builtin_text("calibration.txt").text) and "wrapped paragraph" in text
    assert builtin_text("heldout.txt").text[:200] not in text
    stats = tiny_decoder.train(tmp_path / "m", steps=2, threads=1)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["hidden_size"] == tiny_decoder.CONFIG["hidden_size"] and cfg["tie_word_embeddings"]
    assert cfg["vocab_size"] <= tiny_decoder.TOKENS and stats["params"] > 0
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "m")
    assert tok.decode(tok("The harbour town woke slowly.")["input_ids"]) == "The harbour town woke slowly."
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_quantize_bench_report_uses_same_round_ratios_and_gate_figures():
    from bench.quantize import Variant, report

    gate = {"passed": True, "ppl_increase": 0.031, "top1_agreement": 0.93, "greedy_fraction": 0.5}
    vs = [Variant("ours int4 (daemon)", "daemon", Path("a"), bytes=90 << 20, ppl=27.4,
                  tok_s=[400.0, 150.0, 250.0], rss_mb=[310.0], gate=gate),
          Variant("ours int4", "bundle", Path("a"), bytes=90 << 20, ppl=27.4,
                  tok_s=[300.0, 100.0, 100.0], rss_mb=[280.0], gate=gate),  # best-of: 1.5x genai
          Variant("genai int4", "genai", Path("b"), bytes=86 << 20, ppl=35.9,
                  tok_s=[200.0, 100.0, 125.0])]
    text = report(vs, {}, None)
    # same-round ratios: daemon 2.0, 1.5, 2.0 -> 2.0; in-process 1.5, 1.0, 0.8 -> 1.0
    assert "int4 decode vs genai int4         daemon  2.00x  in-process  1.00x  (goal >= 1.0x)" in text
    assert "int4 decode vs llama.cpp Q4_1     daemon    n/a  in-process    n/a" in text
    assert "+3.1 % perplexity, top-1 0.930  (goal <= +5 %, >= 0.90: met)" in text
    assert "int4 peak RSS                    daemon 310 MiB, in-process 280 MiB" in text
    assert ("peer points both faster (median of same-round ratios) and more accurate than one of "
            "ours: none") in text


def test_quantize_bench_reports_minilms_ladder_with_its_cosine_and_the_kept_step():
    from bench.quantize import Variant, minilm_report, report

    def row(cos: float, passed: bool, kept: str = "", limit: float = 0.97) -> dict:
        return {"format": "ort-matmulnbits", "cosine_min": cos, "cosine_mean": cos + 0.005,
                "passed": passed, "min_cosine": limit, "kept": kept, "bytes": 20 << 20,
                "fp32_bytes": 87 << 20}

    mini = {"int8": row(0.9994, True, limit=0.99),
            "int4": row(0.979, True, "kept zero-point/64 +0.25 8-bit"),
            "int4 step 1 (zero-point-64)": row(0.958, False)}
    lines = minilm_report(mini)
    assert "never 4-bit; fp32 87.0 MiB" in lines[1]
    assert lines[-1].split() == ["int4", "step", "1", "(zero-point-64)", "20.0", "0.9580", "0.9630",
                                 "FAILED", "(min", ">=", "0.97)"]
    kept = "0.9790   0.9840  passed (min >= 0.97), kept zero-point/64 +0.25 8-bit"
    assert lines[-2].rstrip().endswith(kept)
    assert minilm_report({}) == []
    text = report([Variant("ours int4", "bundle", Path("a"), tok_s=[1.0])], mini, None)
    assert "all-MiniLM-L6-v2 int8 cosine min  0.9994  (goal >= 0.99)" in text
    assert "\n".join(lines) in text
