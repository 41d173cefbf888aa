import subprocess
import sys

from fastelectra.cli import info_lines, main


def test_info_lists_versions_and_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for needle in ("fastelectra", "torch", "triton", "GPU", "fused attention / layer norm (Triton)",
                   "fused replace_tokens (fastelectra._C)", "eager (torch reference): usable"):
        assert needle in out
    assert info_lines()[0].startswith("fastelectra ")


def test_python_dash_m_runs_the_cli():
    r = subprocess.run([sys.executable, "-m", "fastelectra", "info"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "backend in force" in r.stdout


def test_info_reports_a_bad_backend_variable_and_exits_1(monkeypatch, capsys):
    monkeypatch.setenv("FASTELECTRA_BACKEND", "bogus")
    assert main(["info"]) == 1                      # everything is printed first, the problem among it
    out = capsys.readouterr().out
    assert "backend in force: none: " in out and "eager (torch reference): usable" in out
