"""`fastelectra pretrain` on the command line: options, bad input (error: ..., exit 2, no traceback);
`fastelectra bench`: the benchmarks behind it, from the repository and from an installed package."""
import os
import subprocess
import sys

import pytest
import torch

from fastelectra.cli import build_parser, main

from test_data import write_corpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pretrain_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for option in ("--preset", "--corpus", "--tokenizer", "--steps", "--batch-size", "--seq-len", "--lr", "--out",
                   "--resume", "--backend", "--compile", "--seed", "--grad-accum", "--warmup-steps", "--save-every",
                   "--log-every", "--weight-decay", "--vocab-size", "--cuda-graphs", "--no-cuda-graphs"):
        assert option in out
    args = build_parser().parse_args(["pretrain"])
    assert (args.preset, args.backend, args.resume, args.compile, args.corpus) == ("tiny", "auto", False, False, None)
    assert args.cuda_graphs is None          # where they can run (fastelectra.pretrain.use_cuda_graphs)
    for flag, value in (("--cuda-graphs", True), ("--no-cuda-graphs", False)):
        assert build_parser().parse_args(["pretrain", flag]).cuda_graphs is value


@pytest.mark.parametrize("make_args, message", [
    (lambda tmp: ["--corpus", str(tmp / "missing.txt")], "error: corpus not found: "),
    (lambda tmp: ["--corpus", str(tmp / "empty.txt")], "error: corpus "),
    (lambda tmp: ["--corpus", str(tmp / "nodocs")], "contains no .txt files"),
    (lambda tmp: ["--corpus", str(tmp / "ok.txt"), "--tokenizer", str(tmp / "broken")],
     "error: cannot read tokenizer "),
    (lambda tmp: ["--corpus", str(tmp / "ok.txt"), "--tokenizer", str(tmp / "nowhere")], "error: tokenizer not found"),
    (lambda tmp: ["--corpus", str(tmp / "ok.txt"), "--steps", "0"], "error: --steps must be an integer >= 1"),
    (lambda tmp: ["--corpus", str(tmp / "ok.txt"), "--resume"], "error: --resume: no checkpoint at "),
    # --seed is checked before the corpus is looked at (else numpy's error came after the tokenizer work)
    (lambda tmp: ["--corpus", str(tmp / "missing.txt"), "--seed", "-1"], "error: --seed must be an integer in [0, 2"),
    (lambda tmp: ["--corpus", str(tmp / "missing.txt"), "--seed", str(2**64)], "error: --seed must be an integer in"),
])
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, capsys, make_args, message):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "nodocs").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{ not json")
    write_corpus(str(tmp_path), n_lines=20, name="ok.txt")
    code = main(["pretrain", "--out", str(tmp_path / "out"), "--no-progress", *make_args(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err


def test_console_script_reports_errors_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fastelectra", "pretrain", "--corpus", str(tmp_path / "nope"),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": REPO})
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: corpus not found: {tmp_path / 'nope'}"


def test_cli_run_prints_the_summary(tmp_path, capsys):
    corpus = write_corpus(str(tmp_path), n_lines=200)
    out = tmp_path / "out"
    code = main(["pretrain", "--corpus", corpus, "--out", str(out), "--steps", "3", "--batch-size", "4",
                 "--seq-len", "32", "--vocab-size", "100", "--backend", "eager", "--no-progress"])
    assert code == 0
    text = capsys.readouterr().out
    assert "pretrained ELECTRA-tiny" in text and "steps 0->3" in text and "rtd_accuracy" in text
    for name in ("metrics.jsonl", "summary.json", "checkpoint.pt", "discriminator", "generator"):
        assert (out / name).exists()


# ----------------------------------------------------------------------------- fastelectra bench
def test_bench_help_lists_every_benchmark(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in ("layernorm", "linear", "attention", "replace", "pretrain", "convergence", "profile", "all"):
        assert f"\n  {name} " in out


@pytest.mark.parametrize("name, option", [("pretrain", "--presets"), ("convergence", "--batch-size"),
                                          ("layernorm", "--hidden"), ("attention", "--shapes"), ("linear", "--widths"),
                                          ("replace", "--sizes"), ("profile", "--backends")])
def test_bench_passes_the_rest_to_the_benchmark(capsys, name, option):
    assert main(["bench", name, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: fastelectra bench {name} ") and option in out
    assert main(["bench", name, "--no-such-option"]) == 2
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


def test_bench_without_a_gpu_says_so_and_fails(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    for argv in (["layernorm"], ["linear"], ["attention"], ["replace"], ["pretrain"], ["convergence"], ["profile"], ["all"]):
        assert main(["bench", *argv]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and ("needs a CUDA GPU" in err or "torch sees no GPU" in err)


def test_installed_bench_runs_outside_the_repository(tmp_path):
    """benchmarks/ ships as fastelectra.benchmarks: `fastelectra bench` works from any folder."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-m", "fastelectra", "bench", "pretrain", "--help"], capture_output=True,
                       text=True, timeout=300, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert "usage: fastelectra bench pretrain" in r.stdout
