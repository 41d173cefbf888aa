"""bench_pretrain on the CPU: its FLOP count against torch's FlopCounterMode, and a smoke run."""
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.bench_pretrain import main, make_batch, step_flops
from fastelectra.config import ElectraConfig
from fastelectra.model import ElectraPretrainingModel


@pytest.mark.parametrize("preset_kw", [dict(), dict(embedding_size=48, hidden_size=96, num_attention_heads=3,
                                                    intermediate_size=200, generator_hidden_size=64)])
def test_step_flops_match_the_flop_counter(preset_kw):
    cfg = ElectraConfig.preset("tiny", vocab_size=1000, backend="eager", **preset_kw)
    model = ElectraPretrainingModel(cfg)
    ids, mask = make_batch(cfg, 4, 64, padded=False, device="cpu")
    torch.manual_seed(0)
    with FlopCounterMode(display=False) as counter:
        out = model(ids, mask)
        out.loss.backward()
    expected = step_flops(cfg.__class__.from_dict({**cfg.to_dict(), "mask_prob": out.num_masked.item() / ids.numel()}),
                          4, 64)
    assert counter.get_total_flops() == pytest.approx(expected, rel=0.02)


def test_make_batch_is_random_and_well_formed():
    cfg = ElectraConfig.preset("tiny")
    ids, mask = make_batch(cfg, 16, 32, padded=True, device="cpu")
    lengths = mask.sum(1)
    assert lengths.min() >= 16 and lengths.max() <= 32 and lengths.unique().numel() > 1
    assert (ids[:, 0] == cfg.cls_token_id).all()
    assert (ids[torch.arange(16), lengths - 1] == cfg.sep_token_id).all()
    assert (ids[mask == 0] == cfg.pad_token_id).all()


def test_smoke_run_on_cpu(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "pretrain.json"
    assert main(["--device", "cpu", "--presets", "tiny", "--padding", "padded", "--steps", "1", "--warmup", "1",
                 "--contenders", "fastelectra-eager", "hf-eager", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["contender"] for r in rows] == ["fastelectra-eager", "hf-eager"]
    assert all(r["seq_per_s"] > 0 for r in rows)
    assert rows[0]["x_vs_hf-eager"] == pytest.approx(rows[0]["seq_per_s"] / rows[1]["seq_per_s"])
    header = (tmp_path / "pretrain.md").read_text().splitlines()[0]
    assert "x_vs_hf-eager" in header and "x_vs_fastelectra-eager" in header   # a column per peer measured
    assert "x_vs_hf-sdpa" not in header


def test_an_interrupted_run_still_writes_what_it_measured(tmp_path, monkeypatch):
    """run_gpu.sh caps each benchmark with `timeout -s INT`: the rows measured before the SIGINT are written,
    marked truncated, and the exit status says so."""
    import benchmarks.bench_pretrain as bp

    real, calls = bp.measure, []

    def measure_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(bp, "measure", measure_then_interrupt)
    out = tmp_path / "pretrain.json"
    assert main(["--device", "cpu", "--presets", "tiny", "--padding", "full", "--steps", "1", "--warmup", "1",
                 "--contenders", "fastelectra-eager", "fastelectra-fused", "--out", str(out)]) == 1
    payload = json.loads(out.read_text())
    assert payload["truncated"] is True and [r["contender"] for r in payload["rows"]] == ["fastelectra-fused"]
    assert (tmp_path / "pretrain.md").read_text().startswith("**truncated")
