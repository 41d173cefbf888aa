"""benchmarks/convergence.py: the fused-vs-eager criterion on synthetic curves, and a short CPU run
(backend fused on CPU = the _C replacement op + the torch references) whose curves pass it while a
broken copy of them fails."""
import json

import pytest
import torch

from benchmarks import convergence
from fastelectra import data

from test_data import write_corpus


def noise(seed, sigma, steps=120):
    return sigma * torch.randn(steps, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def curve(seed):
    """A decaying loss curve plus per-step noise."""
    return (2 + 5 * torch.exp(-torch.arange(120, dtype=torch.float64) / 30) + noise(seed, 0.05)).tolist()


def test_criterion_passes_noise_and_fails_a_broken_curve():
    eager, eager_seed = curve(seed=1), curve(seed=2)
    fused = (torch.tensor(eager) + noise(3, 0.02)).tolist()      # eager + a little noise of its own
    ok = convergence.compare(fused, eager, eager_seed, window=10)
    assert ok["passed"] and ok["finite"] and 0 < ok["gap"] < ok["noise"] < ok["tolerance"]
    assert len(ok["windows"]["fused"]) == 12

    slow = [v + (0.3 if i >= 40 else 0.0) for i, v in enumerate(fused)]   # stops learning as fast after step 40
    bad = convergence.compare(slow, eager, eager_seed, window=10)
    assert not bad["passed"] and bad["gap"] > bad["tolerance"]

    diverged = fused[:-1] + [float("nan")]
    assert not convergence.compare(diverged, eager, eager_seed, window=10)["passed"]


def test_criterion_edge_cases():
    flat = [3.0] * 10
    same = convergence.compare(flat, flat, flat, window=3)       # no noise at all: equal curves still pass
    assert same["passed"] and same["gap"] == same["noise"] == 0 and same["ratio"] is None
    assert len(same["windows"]["eager"]) == 4                   # windows of 3, 3, 3 and 1 steps
    assert not convergence.compare([3.1] * 10, flat, flat, window=3)["passed"]
    with pytest.raises(ValueError, match="equal length"):
        convergence.compare(flat, flat[:-1], flat, window=3)
    with pytest.raises(ValueError, match="window"):
        convergence.compare(flat, flat, flat, window=0)


def test_short_cpu_run_passes_and_a_broken_curve_fails(tmp_path, extension_built):   # fused needs _C
    corpus = write_corpus(str(tmp_path / "corpus"), n_lines=400)
    tok = data.get_tokenizer(None, data.resolve_corpus(corpus), 120, str(tmp_path / "tok"))[1]
    out = tmp_path / "results" / "convergence.json"
    steps = 8
    code = convergence.main(["--device", "cpu", "--presets", "tiny", "--steps", str(steps), "--batch-size", "8",
                             "--seq-len", "32", "--window", "2", "--corpus", corpus, "--tokenizer", tok,
                             "--work-dir", str(tmp_path / "runs"), "--out", str(out)])
    result = json.loads(out.read_text())
    assert code == 0 and result["passed"]
    assert (tmp_path / "results" / "convergence.md").read_text().count("| tiny |") == 3
    (r,) = result["results"]
    c = r["curves"]
    assert c["fused"]["step"] == c["eager"]["step"] == list(range(1, steps + 1))
    assert r["runs"]["fused"]["backend"] == "fused" and r["runs"]["eager-seed"]["seed"] == 1
    # one seed: same weights, batch and masked positions, so step 1's MLM loss agrees (tiny has no dropout);
    # the replacements differ (Philox in the op, torch's generator in the reference), and another seed differs
    assert c["fused"]["mlm_loss"][0] == pytest.approx(c["eager"]["mlm_loss"][0], rel=1e-5)
    assert c["fused"]["rtd_loss"] != c["eager"]["rtd_loss"]
    assert c["eager-seed"]["mlm_loss"][0] != pytest.approx(c["eager"]["mlm_loss"][0], rel=1e-5)

    for m in convergence.TESTED:
        broken = [v * 1.5 for v in c["fused"][m]]                 # a fused path that learns wrongly
        assert not convergence.compare(broken, c["eager"][m], c["eager-seed"][m], window=2)["passed"]
