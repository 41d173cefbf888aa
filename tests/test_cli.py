"""`fastelectra pretrain` on the command line: options, bad input (error: ..., exit 2, no traceback)."""
import os
import subprocess
import sys

import pytest

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
                   "--log-every", "--weight-decay", "--vocab-size"):
        assert option in out
    args = build_parser().parse_args(["pretrain"])
    assert (args.preset, args.backend, args.resume, args.compile, args.corpus) == ("tiny", "auto", False, False, None)


@pytest.mark.parametrize("make_args, message", [
    (lambda tmp: ["--corpus", str(tmp / "missing.txt")], "error: corpus not found: "),
    (lambda tmp: ["--corpus", str(tmp / "empty.txt")], "error: corpus "),
    (lambda tmp: ["--corpus", str(tmp / "nodocs")], "contains no .txt files"),
    (lambda tmp: ["--corpus", str(tmp / "ok.txt"), "--tokenizer", str(tmp / "broken")],
     "error: cannot read tokenizer "),
    (lambda tmp: ["--corpus", str(tmp / "ok.txt"), "--tokenizer", str(tmp / "nowhere")], "error: tokenizer not found"),
    (lambda tmp: ["--corpus", str(tmp / "ok.txt"), "--steps", "0"], "error: --steps must be an integer >= 1"),
    (lambda tmp: ["--corpus", str(tmp / "ok.txt"), "--resume"], "error: --resume: no checkpoint at "),
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
