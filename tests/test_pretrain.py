"""fastelectra.pretrain: the training loop, checkpoints, exact resume, DDP (gloo, 2 processes), exports."""
import contextlib
import errno
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from fastelectra import data
from fastelectra import pretrain as pt
from fastelectra.data import FastElectraError
from fastelectra.pretrain import PretrainConfig, pretrain

from test_data import write_corpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a small but real run: tiny preset, 8 x 32 tokens per step, with dropout (so its randomness is exercised), on
# the CPU on any machine (the CUDA loop, with bf16 and graphs, has its own gpu tests)
SMALL = dict(preset="tiny", batch_size=8, seq_len=32, dropout=0.1, log_every=1, progress=False, backend="eager",
             device="cpu")
LOGGED = ("loss", "mlm_loss", "rtd_loss", "mlm_accuracy", "rtd_accuracy", "rtd_precision", "rtd_recall", "lr",
          "grad_norm")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(str(tmp_path_factory.mktemp("corpus")), n_lines=400)


@pytest.fixture(scope="module")
def tok(corpus, tmp_path_factory):
    """One WordPiece vocab for the runs that are compared with each other: tokenizers' trainer breaks
    ties in hash-map order, so two trainings on one corpus can differ (huggingface/tokenizers#1794);
    a run caches its own, so resuming in the same folder is unaffected."""
    return data.get_tokenizer(None, data.resolve_corpus(corpus), 120, str(tmp_path_factory.mktemp("tok")))[1]


def rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def cli(*args, env=None):
    """Run ``python -m fastelectra pretrain ...`` in a fresh process."""
    env = {**os.environ, "PYTHONPATH": REPO, **(env or {})}
    return subprocess.run([sys.executable, "-m", "fastelectra", "pretrain", *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=REPO)


def small_cli_args(corpus, tok, out, **extra):
    """SMALL's run as command-line arguments, ``extra`` added or replacing."""
    options = {"corpus": corpus, "tokenizer": tok, "out": out, "batch_size": 8, "seq_len": 32, "dropout": 0.1,
               "log_every": 1, "backend": "eager", "device": "cpu", **extra}
    args = ["--no-progress"]
    for k, v in options.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def model_state(out):
    return torch.load(os.path.join(out, "checkpoint.pt"), map_location="cpu", weights_only=True)["model"]


# ----------------------------------------------------------------------------- options and pieces
def test_preset_defaults_follow_the_paper():
    for name, lr, batch, seq in (("small", 5e-4, 128, 128), ("base", 2e-4, 256, 512), ("large", 2e-4, 2048, 512)):
        c = pt.resolve_options(PretrainConfig(preset=name))
        assert (c.lr, c.batch_size, c.seq_len, c.warmup_steps) == (lr, batch, seq, 10_000)
    c = pt.resolve_options(PretrainConfig(preset="small", steps=100))
    assert c.warmup_steps == 10 and c.out == os.path.join("runs", "small") and c.dropout == 0.1
    tiny = pt.resolve_options(PretrainConfig())
    assert (tiny.preset, tiny.corpus, tiny.tokenizer, tiny.dropout) == ("tiny", None, None, 0.0)
    ids = dict(vocab_size=300, pad_token_id=0, unk_token_id=1, cls_token_id=2, sep_token_id=3, mask_token_id=4)
    mcfg = pt.model_config(pt.resolve_options(PretrainConfig(seq_len=256, backend="eager")), ids)
    assert (mcfg.vocab_size, mcfg.mask_token_id, mcfg.hidden_dropout_prob, mcfg.max_position_embeddings,
            mcfg.backend) == (300, 4, 0.0, 256, "eager")
    for bad, match in ((dict(steps=0), "--steps must be an integer >= 1"), (dict(lr=-1.0), "--lr must be a positive"),
                       (dict(seq_len=2), "--seq-len"), (dict(preset="huge"), "unknown preset 'huge'"),
                       (dict(backend="cuda"), "--backend"), (dict(model_overrides={"hiden": 1}), "hiden"),
                       (dict(model_overrides={"extra": {}}), "extra"),
                       (dict(seed=-1), r"--seed must be an integer in \[0, 2\*\*32 - 1"),
                       (dict(seed=2**32), "--seed must be an integer in"), (dict(seed=1.5), "--seed"),
                       (dict(seed=True), "--seed")):
        with pytest.raises(FastElectraError, match=match):
            pt.resolve_options(PretrainConfig(**bad))
    assert pt.resolve_options(PretrainConfig(seed=2**32 - 1)).seed == 2**32 - 1


def test_lr_schedule_and_weight_decay_groups():
    f = pt.lr_lambda(4, 10)
    assert [round(f(s), 4) for s in range(10)] == [0.25, 0.5, 0.75, 1.0, 1.0, 0.8333, 0.6667, 0.5, 0.3333, 0.1667]
    from fastelectra.config import ElectraConfig
    from fastelectra.model import ElectraPretrainingModel

    model = ElectraPretrainingModel(ElectraConfig.preset("tiny", vocab_size=100, pad_token_id=0, unk_token_id=1,
                                                         cls_token_id=2, sep_token_id=3, mask_token_id=4))
    opt = pt.build_optimizer(model, 1e-3, 0.01, torch.device("cpu"))
    decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all("LayerNorm" not in names[id(p)] and not names[id(p)].endswith(".bias") for p in decay["params"])
    assert all("LayerNorm" in names[id(p)] or names[id(p)].endswith(".bias") for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("grad_scale", [1e-3, 30.0])   # clip inactive / active
def test_clip_and_step_equals_clip_grad_norm_then_step(fused, grad_scale):
    # eps = 0.1 makes Adam's update depend on the gradients' scale, so a missing clip shows (third model)
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(13, 7), torch.nn.GELU(), torch.nn.Linear(7, 3)) for _ in range(3)]
    for m in models:
        m.load_state_dict(models[0].state_dict())
        m[2].bias.requires_grad_(False)                  # a parameter without a gradient is left alone
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, eps=0.1, fused=fused)
            for m in models]
    for _ in range(3):
        x = torch.randn(5, 13)
        for m in models:
            (m(x).square().sum() * grad_scale).backward()
        norm = pt.clip_and_step(opts[0], models[0].parameters(), 1.0)
        expected = torch.nn.utils.clip_grad_norm_(models[1].parameters(), 1.0)
        opts[1].step()
        opts[2].step()                                   # not clipped
        torch.testing.assert_close(norm, expected)
        assert not hasattr(opts[0], "grad_scale")       # no factor left over for a later plain step()
        for o in opts:
            o.zero_grad()
    for a, b, c in zip(models[0].parameters(), models[1].parameters(), models[2].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert torch.equal(a, c) == (grad_scale < 1 or not a.requires_grad)


def test_checkpoint_write_failure_keeps_the_previous_one(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    pt.save_checkpoint({"step": 1}, path)

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pt.os, "fsync", disk_full)
    with pytest.raises(FastElectraError, match=r"could not write checkpoint .*checkpoint.pt: .*No space left"):
        pt.save_checkpoint({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert os.listdir(tmp_path) == ["checkpoint.pt"]          # the temp file is gone


# ----------------------------------------------------------------------------- runs
def test_pretrain_logs_checkpoints_and_exports(corpus, tok, tmp_path):
    out = str(tmp_path / "run")
    summary = pretrain(PretrainConfig(corpus=corpus, vocab_size=120, out=out, steps=4, save_every=2, **SMALL))
    assert summary["tokenizer"].startswith(os.path.join(out, "cache", "wordpiece-120-"))
    assert summary["steps"] == 4 and summary["first"]["step"] == 1 and summary["final"]["step"] == 4
    assert json.load(open(os.path.join(out, "summary.json")))["final"] == summary["final"]
    logged = rows(out)
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    assert all(set(LOGGED) | {"step", "seq_per_s"} <= set(r) for r in logged)
    assert all(0 <= r[k] <= 1 for r in logged for k in ("mlm_accuracy", "rtd_accuracy"))
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), map_location="cpu", weights_only=True)
    assert ckpt["data"]["step"] == 4 and {"torch", "python", "numpy", "cuda"} <= set(ckpt["rng"])
    assert ckpt["scheduler"]["last_epoch"] == 4 and ckpt["optimizer"]["state"]
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]

    from fastelectra.model import ElectraDiscriminator, ElectraGenerator

    disc = ElectraDiscriminator.from_pretrained(os.path.join(out, "discriminator"))
    gen = ElectraGenerator.from_pretrained(os.path.join(out, "generator"))
    assert disc.config.vocab_size == summary["vocab_size"] and gen.config.hidden_size == 32
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.AutoTokenizer.from_pretrained(os.path.join(out, "discriminator"))
    hf = transformers.ElectraForPreTraining.from_pretrained(os.path.join(out, "discriminator")).eval()
    enc = hf_tok(["the cat sat on the mat."], return_tensors="pt")
    with torch.no_grad():
        ours = disc.eval()(enc["input_ids"], enc["attention_mask"])
        theirs = hf(**enc).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_a_short_run_learns(corpus, tok, tmp_path):
    summary = pretrain(PretrainConfig(corpus=corpus, tokenizer=tok, out=str(tmp_path / "run"), steps=60, lr=5e-3,
                                      save_every=0, **{**SMALL, "log_every": 10}))
    first, final = summary["first"], summary["final"]
    assert final["mlm_loss"] < first["mlm_loss"] - 0.5
    assert final["mlm_accuracy"] > first["mlm_accuracy"] + 0.03
    assert final["rtd_accuracy"] > first["rtd_accuracy"] + 0.1


def test_compiled_run_is_one_graph_and_matches_eager(corpus, tok, tmp_path):
    """--compile compiles the step with fullgraph=True (inductor, here on the CPU): it must trace as one
    graph and train like the eager run (the same losses up to inductor's fp32 reassociation; inductor
    is told to draw random numbers as eager torch does, so both runs mask and sample alike)."""
    import torch._inductor.config

    with torch._inductor.config.patch(fallback_random=True):
        runs = [pretrain(PretrainConfig(corpus=corpus, tokenizer=tok, out=str(tmp_path / name), steps=4,
                                        save_every=0, compile=compile_, **{**SMALL, "dropout": 0.0}))
                for name, compile_ in (("eager", False), ("compiled", True))]
    eager, compiled = (rows(str(tmp_path / name)) for name in ("eager", "compiled"))
    assert runs[1]["compile"] is True
    for a, b in zip(eager, compiled):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3), (a, b)
    with pytest.raises(FastElectraError, match="--cuda-graphs needs a CUDA device"):
        pretrain(PretrainConfig(corpus=corpus, tokenizer=tok, out=str(tmp_path / "g"), steps=1, cuda_graphs=True,
                                **SMALL))
    with pytest.raises(FastElectraError, match="--cuda-graphs and --compile do not go together"):
        pretrain(PretrainConfig(corpus=corpus, tokenizer=tok, out=str(tmp_path / "g"), steps=1, cuda_graphs=True,
                                compile=True, **SMALL))
    from fastelectra.graphs import capture

    with pytest.raises(FastElectraError, match="CUDA graphs need a CUDA device"):
        capture(lambda: None, torch.device("cpu"))


def test_cuda_graphs_are_on_by_default_where_they_can_run():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")     # device objects only: no GPU needed
    auto = PretrainConfig()
    assert auto.cuda_graphs is None
    assert pt.use_cuda_graphs(auto, cuda, 1, unpad=False) is True
    assert pt.use_cuda_graphs(auto, cpu, 1, unpad=False) is False
    assert pt.use_cuda_graphs(auto, cuda, 2, unpad=False) is False                        # DDP
    assert pt.use_cuda_graphs(PretrainConfig(compile=True), cuda, 1, unpad=False) is False
    assert pt.use_cuda_graphs(auto, cuda, 1, unpad=True) is False
    assert pt.use_cuda_graphs(PretrainConfig(cuda_graphs=False), cuda, 1, unpad=False) is False
    asked = PretrainConfig(cuda_graphs=True)
    assert pt.use_cuda_graphs(asked, cuda, 1, unpad=False) is True
    for device, world, unpad, message in ((cpu, 1, False, "needs a CUDA device"), (cuda, 2, False, "runs on one GPU"),
                                          (cuda, 1, True, "does not go with unpad=True")):
        with pytest.raises(FastElectraError, match=message):
            pt.use_cuda_graphs(asked, device, world, unpad)


@pytest.mark.gpu
def test_default_cuda_run_uses_graphs_and_falls_back_when_capture_fails(corpus, tok, tmp_path, monkeypatch):
    cfg = {**SMALL, "backend": "auto", "device": "cuda", "num_workers": 0, "steps": 3, "warmup_steps": 1,
           "save_every": 0}
    assert pretrain(PretrainConfig(corpus=corpus, tokenizer=tok, out=str(tmp_path / "auto"), **cfg))["cuda_graphs"]
    from fastelectra import graphs

    def broken(*args, **kwargs):
        raise RuntimeError("capture refused")

    monkeypatch.setattr(graphs, "capture", broken)
    with pytest.warns(RuntimeWarning, match="capture refused"):
        summary = pretrain(PretrainConfig(corpus=corpus, tokenizer=tok, out=str(tmp_path / "fallback"), **cfg))
    assert summary["cuda_graphs"] is False and len(rows(str(tmp_path / "fallback"))) == 3
    with pytest.raises(FastElectraError, match="--cuda-graphs: capturing the training step failed"):
        pretrain(PretrainConfig(corpus=corpus, tokenizer=tok, out=str(tmp_path / "asked"), cuda_graphs=True, **cfg))


@pytest.mark.gpu
@pytest.mark.parametrize("grad_accum", [1, 2])
@pytest.mark.parametrize("backend", ["fused", "eager"])
def test_cuda_graph_run_matches_the_python_loop(corpus, tok, tmp_path, backend, grad_accum):
    """--cuda-graphs replays a captured forward+backward: with the same per-micro-batch seeds it must give
    the losses and gradient norms of the plain loop (bf16; the same kernels, so only reduction-order noise),
    with the LR schedule applied outside the graph. With gradient accumulation the replays add into the
    same grad buffers; with one micro-batch each replay writes them afresh (a gradient left over from the
    step before would show in grad_norm)."""
    from fastelectra.backend import replayed_work

    cfg = {**SMALL, "backend": backend, "grad_accum": grad_accum, "device": "cuda", "num_workers": 0}
    runs = []
    for name, graphs in (("loop", False), ("graphs", True)):
        # the loop inside replayed_work: the fused linear layers that the graph's warm-up and capture run
        with replayed_work() if not graphs else contextlib.nullcontext():
            runs.append(pretrain(PretrainConfig(corpus=corpus, tokenizer=tok, out=str(tmp_path / name), steps=5,
                                                warmup_steps=2, save_every=0, cuda_graphs=graphs, **cfg)))
    assert runs[1]["cuda_graphs"] is True and runs[0]["cuda_graphs"] is False
    loop, graphed = rows(str(tmp_path / "loop")), rows(str(tmp_path / "graphs"))
    assert len(loop) == len(graphed) == 5
    for a, b in zip(loop, graphed):
        for key in ("loss", "mlm_loss", "rtd_loss", "lr"):
            assert b[key] == pytest.approx(a[key], rel=2e-2, abs=1e-3), (key, a, b)
        # bf16 gradients of the same kernels: a few % apart at most; one step's gradient left over into the
        # next would put the norm of a sum of two steps' gradients here (~1.4x for unrelated ones)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=5e-2), (a, b)
    assert graphed[-1]["loss"] < graphed[0]["loss"] + 0.5      # it trains (the weights moved sanely)


def test_interrupted_and_resumed_run_reproduces_the_losses(corpus, tok, tmp_path, monkeypatch):
    steps, k = 6, 3
    full = str(tmp_path / "full")
    pretrain(PretrainConfig(corpus=corpus, tokenizer=tok, out=full, steps=steps, save_every=k, **SMALL))

    # the interrupted run: stops right after writing its checkpoint at step k
    part = str(tmp_path / "part")
    save = pt.save_checkpoint

    def save_then_die(state, path):
        save(state, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(pt, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        pretrain(PretrainConfig(corpus=corpus, tokenizer=tok, out=part, steps=steps, save_every=k, **SMALL))
    monkeypatch.undo()
    assert [r["step"] for r in rows(part)] == [1, 2, 3]
    with open(os.path.join(part, "metrics.jsonl"), "a") as f:   # a line logged after the checkpoint: dropped
        f.write(json.dumps({**rows(part)[-1], "step": 4}) + "\n")

    r = cli(*small_cli_args(corpus, tok, part, steps=steps, save_every=k), "--resume")
    assert r.returncode == 0, r.stderr
    assert "steps 3->6" in r.stdout
    a, b = rows(full), rows(part)
    assert [x["step"] for x in b] == list(range(1, steps + 1))
    for x, y in zip(a, b):
        assert {m: x[m] for m in LOGGED} == {m: y[m] for m in LOGGED}, f"step {x['step']}"
    sa, sb = model_state(full), model_state(part)
    assert all(torch.equal(sa[n], sb[n]) for n in sa)


def test_resume_rejects_another_config(corpus, tok, tmp_path):
    out = str(tmp_path / "run")
    with pytest.raises(FastElectraError, match="--resume: no checkpoint at .*checkpoint.pt"):
        pretrain(PretrainConfig(corpus=corpus, tokenizer=tok, out=out, steps=2, resume=True, **SMALL))
    pretrain(PretrainConfig(corpus=corpus, tokenizer=tok, out=out, steps=2, **SMALL))
    with pytest.raises(FastElectraError, match=r"another configuration: num_hidden_layers=2 there, 1 here"):
        pretrain(PretrainConfig(corpus=corpus, tokenizer=tok, out=out, steps=4, resume=True,
                                model_overrides={"num_hidden_layers": 1}, **SMALL))
    with pytest.raises(FastElectraError, match=r"another configuration: .*seq_len=32 there, 16 here"):
        pretrain(PretrainConfig(corpus=corpus, tokenizer=tok, out=out, steps=4, resume=True,
                                **{**SMALL, "seq_len": 16}))
    with pytest.raises(FastElectraError, match=r"another configuration: --lr=0.002 there, 0.05 here"):
        pretrain(PretrainConfig(corpus=corpus, tokenizer=tok, out=out, steps=4, resume=True, lr=0.05, **SMALL))
    with pytest.raises(FastElectraError, match=r"--weight-decay=0.01 there, 0.1 here"):
        pretrain(PretrainConfig(corpus=corpus, tokenizer=tok, out=out, steps=4, resume=True, weight_decay=0.1,
                                **SMALL))
    for steps in (1, 2):
        with pytest.raises(FastElectraError, match=r"checkpoint is at step 2 and --steps is %d: nothing to train" % steps):
            pretrain(PretrainConfig(corpus=corpus, tokenizer=tok, out=out, steps=steps, resume=True, **SMALL))
    with open(os.path.join(out, "checkpoint.pt"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(FastElectraError, match="cannot read checkpoint .*checkpoint.pt"):
        pretrain(PretrainConfig(corpus=corpus, tokenizer=tok, out=out, steps=4, resume=True, **SMALL))


def test_resume_keeps_the_schedule_and_the_trained_vocab(corpus, tmp_path):
    """A longer --steps on resume keeps the checkpoint's warmup (its default follows --steps), lr, weight
    decay and dropout when they are not given again; a deleted OUT/cache gets the trained vocab back from
    the checkpoint (retraining would differ)."""
    out = str(tmp_path / "run")
    opts = {**SMALL, "log_every": 1}
    del opts["dropout"]
    pretrain(PretrainConfig(corpus=corpus, out=out, steps=10, vocab_size=300, weight_decay=0.05, dropout=0.2,
                            **opts))                                                     # warmup min(80, 10 // 10) = 1
    shutil.rmtree(os.path.join(out, "cache"))
    pretrain(PretrainConfig(corpus=corpus, out=out, steps=40, save_every=0, vocab_size=300, resume=True, **opts))
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert ckpt["options"]["weight_decay"] == 0.05 and ckpt["model_config"]["hidden_dropout_prob"] == 0.2
    lr = rows(out)[10]["lr"]                                # step 11: the lr the step after 10 used
    assert rows(out)[10]["step"] == 11
    assert lr == pytest.approx(2e-3 * pt.lr_lambda(1, 40)(10), rel=1e-6)      # warmup 1 (40 // 10 would be 4)


def test_vocab_mismatch_is_an_error(corpus, tok, tmp_path):
    out = str(tmp_path / "run")
    with pytest.raises(FastElectraError, match=r"--vocab-size 500 does not match the tokenizer .* has \d+ tokens"):
        pretrain(PretrainConfig(corpus=corpus, tokenizer=tok, out=out, steps=1, **SMALL, vocab_size=500))
    with pytest.raises(FastElectraError, match=r"the model config has vocab_size=30522 but the tokenizer has \d+"):
        pretrain(PretrainConfig(corpus=corpus, tokenizer=tok, out=out, steps=1, model_overrides={"vocab_size": 30522},
                                **SMALL))
    with pytest.raises(FastElectraError, match="cannot read tokenizer"):
        os.makedirs(os.path.join(out, "bad"))
        with open(os.path.join(out, "bad", "tokenizer.json"), "w") as f:
            f.write("not json")
        pretrain(PretrainConfig(corpus=corpus, tokenizer=os.path.join(out, "bad"), out=out, steps=1, **SMALL))


def test_full_disk_during_a_run_keeps_the_last_checkpoint(corpus, tok, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    calls = []
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:      # the second checkpoint (step 4): the disk fills up half-way
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(pt.torch, "save", save)
    with pytest.raises(FastElectraError, match="could not write checkpoint .*No space left on device"):
        pretrain(PretrainConfig(corpus=corpus, tokenizer=tok, out=out, steps=4, save_every=2, **SMALL))
    monkeypatch.undo()
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), map_location="cpu", weights_only=True)
    assert ckpt["data"]["step"] == 2
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_gloo_processes_match_one_process(corpus, tok, tmp_path):
    """Two processes (gloo) with micro-batches of 4 == one process accumulating two micro-batches of 4.

    The masking, sampling and dropout of micro-batch j of step s come from a seed derived from
    (seed, s, j) whatever process runs it, so both layouts compute the same per-micro-batch losses
    (dropout stays on: 0.1); DDP averages the two ranks' gradients as accumulation
    averages the two micro-batches'. Only float summation order differs."""
    steps = 3
    single = str(tmp_path / "single")
    pretrain(PretrainConfig(corpus=corpus, tokenizer=tok, out=single, steps=steps, grad_accum=2, **SMALL))
    ddp = str(tmp_path / "ddp")
    os.makedirs(ddp)
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "fastelectra", "pretrain",
           *small_cli_args(corpus, tok, ddp, steps=steps)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "x2" in r.stdout                                     # the summary reports world size 2
    a, b = rows(single), rows(ddp)
    assert [x["step"] for x in b] == list(range(1, steps + 1))
    for x, y in zip(a, b):
        for m in ("loss", "mlm_loss", "rtd_loss", "mlm_accuracy", "rtd_accuracy"):
            assert y[m] == pytest.approx(x[m], rel=1e-5, abs=1e-6), (x["step"], m)
    sa, sb = model_state(single), model_state(ddp)
    for n in sa:
        torch.testing.assert_close(sb[n], sa[n], atol=1e-5, rtol=1e-5, msg=lambda m: f"{n}: {m}")
    # a different split of the global batch (one micro-batch of 8) draws other masks: not the same run
    other = str(tmp_path / "other")
    pretrain(PretrainConfig(corpus=corpus, tokenizer=tok, out=other, steps=1, **SMALL))
    assert rows(other)[0]["loss"] != a[0]["loss"]
