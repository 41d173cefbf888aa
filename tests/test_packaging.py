"""What a release carries: the source distribution has every file setup.py compiles and the whole test
suite, and a wheel carries the extension's sources, so that a wheel whose fastelectra._C did not build
can still JIT-build the op (fastelectra.extension)."""
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

from fastelectra import extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def source_files(folder):
    """The files of a folder of the checkout, as paths relative to the root (no caches or build outputs)."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, folder)):
        dirnames[:] = [d for d in dirnames if d not in ("__pycache__", ".pytest_cache")]
        found |= {os.path.relpath(os.path.join(dirpath, f), ROOT) for f in filenames
                  if not f.endswith((".pyc", ".so", ".o"))}
    return found


def clean_copy(dest):
    """The checkout's own files (git's list, else a walk without build outputs) copied to ``dest``: a build
    here would also pick up what earlier builds left (egg-info's SOURCES.txt, build/lib)."""
    try:
        files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout.split("\0")
    except (OSError, subprocess.CalledProcessError):
        skip = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.so", "runs")
        shutil.copytree(ROOT, dest, ignore=skip)
        return dest
    for f in filter(None, files):
        if os.path.exists(os.path.join(ROOT, f)):      # tracked, not deleted in the working tree
            os.makedirs(os.path.dirname(os.path.join(dest, f)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, f), os.path.join(dest, f))
    return dest


def build(tmp_path, *cmd):
    """Run a packaging command in a clean copy of the checkout; the one file it writes to tmp_path/out."""
    src, out = clean_copy(tmp_path / "src"), tmp_path / "out"
    # no extension build: the sources must get in by the package's own rules, not as an extension's inputs
    env = {**os.environ, "FASTELECTRA_SKIP_EXT": "1"}
    r = subprocess.run([sys.executable, *cmd, str(out)], cwd=src, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (made,) = os.listdir(out)
    return out / made


def test_source_distribution_has_the_extension_sources_and_the_tests(tmp_path):
    """A wheel built from the sdist (as `python -m build` does) must find csrc's headers and the .cu: without
    them setup.py's build failed and the wheel shipped without fastelectra._C."""
    sdist = build(tmp_path, "setup.py", "-q", "sdist", "--formats=gztar", "-d")
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    want = source_files("csrc") | source_files("tests")
    assert {"csrc/philox.h", "csrc/replace_tokens_kernel.cu", "tests/conftest.py"} <= want
    assert want <= names, sorted(want - names)
    assert not [n for n in names if n.endswith((".so", ".pyc"))]


def test_wheel_carries_the_extension_sources(tmp_path):
    wheel = build(tmp_path, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", ".", "-w")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    want = {"fastelectra/csrc/" + os.path.basename(f) for f in source_files("csrc")}
    assert want <= names, sorted(want - names)
    assert {"fastelectra/kernels/attention.py", "fastelectra/benchmarks/bench_pretrain.py"} <= names
    assert not [n for n in names if n.endswith(".so")]


def test_jit_sources_are_found_in_a_checkout_or_an_installed_package(tmp_path, monkeypatch):
    site = tmp_path / "site-packages"
    package = site / "fastelectra"
    (package / "csrc").mkdir(parents=True)
    monkeypatch.setattr(extension, "_PACKAGE", str(package))
    assert extension._sources_folder() == str(site / "csrc")        # neither has sources: named in the error
    (package / "csrc" / "replace_tokens.cpp").write_text("")
    assert extension._sources_folder() == str(package / "csrc")     # an installed wheel's copy
    (site / "csrc").mkdir()
    (site / "csrc" / "replace_tokens.cpp").write_text("")
    assert extension._sources_folder() == str(site / "csrc")        # a checkout's csrc/ beside the package
    assert extension.CSRC == os.path.join(ROOT, "csrc")             # this checkout
