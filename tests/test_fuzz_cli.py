"""Odd arguments to the kvmem command, run in-process through kvmem.cli.main: exit 2 and a message, no traceback.

``bench`` always gets at least one bad value (so it must refuse before running anything) among
well-formed ones of a tiny run; ``info`` gets odd paths. Tallied under ``cli`` (kvmem.testing.fuzz).
"""

import contextlib
import io
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kvmem
from kvmem.cli import main
from kvmem.testing import odd
from kvmem.testing.fuzz import TALLY, attempt, fuzz_settings, scratch_folder

GOOD = {
    "--size": ["64", "100"], "--dim": ["4", "8"], "--k": ["1", "4"], "--queries": ["4"], "--repeats": ["1"],
    "--seed": ["0", "7"], "--dataset": ["gaussian", "clustered"], "--metric": ["ip", "l2", "cos"],
    "--dtype": ["float32", "bfloat16"], "--backends": ["exact", "exact,torch-naive"], "--nprobe": ["1,4"],
    "--ef": ["16"],
}
BAD = {
    "--size": ["0", "-1", "abc", "1e3", "", "99999999999999999999999"], "--dim": ["0", "-8", "8.5"], "--k": ["0", "x"],
    "--queries": ["-1"], "--repeats": ["0"], "--seed": ["-1", "nan"], "--metric": ["dot", "IP", ""],
    "--dtype": ["int8", "fp16"], "--backends": ["nope", ",,", "exact,nope"], "--nprobe": ["0", "a,b", "1,,2", ""],
    "--ef": ["-1", "1.5"], "--dataset": ["nope", "{root}/missing.fvecs", "{root}/a-file", "{root}/a-file.hdf5"],
    "--out": ["{root}/a-file", "{root}/a-file/inside"],
}


def _run(argv):
    """main(argv) -> exit code, with its output swallowed (argparse exits through SystemExit)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            return main(argv)
        except SystemExit as exc:
            return exc.code


@pytest.fixture(scope="module")
def root():
    path = scratch_folder(Path(tempfile.mkdtemp(prefix="kvmem-fuzz-cli-")))
    (path / "a-file.hdf5").write_bytes(b"not hdf5")
    store = kvmem.create("exact", dim=4, value_dim=2, partitions=2)
    store.add(torch.randn(2, 3, 4), torch.randn(2, 3, 2))
    store.save(path / "saved")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@st.composite
def bench_argv(draw, root):
    bad_name = draw(st.sampled_from(sorted(BAD)))
    good = draw(st.dictionaries(st.sampled_from(sorted(set(GOOD) - {bad_name})), st.none(), max_size=6))
    pairs = [(name, draw(st.sampled_from(GOOD[name]))) for name in good]
    pairs.append((bad_name, draw(st.sampled_from(BAD[bad_name])).format(root=root)))
    pairs = draw(st.permutations(pairs))
    safe = ["--size", "64", "--queries", "4", "--backends", "exact", "--out", str(root / "out")]
    return ["bench", *safe, *(part for pair in pairs for part in pair)]


def test_fuzz_bench_refuses_every_bad_argument_before_running(root):
    @fuzz_settings(40)
    @given(argv=bench_argv(root))
    def run(argv):
        ok, code = attempt("cli", f"kvmem {' '.join(argv)}", lambda: _run(argv), refused=lambda code: code == 2)
        ran = (root / "out" / "results.json").exists()
        shutil.rmtree(root / "out", ignore_errors=True)
        assert code == 2, f"kvmem {' '.join(argv)} exited {code}; a bad argument must exit 2"
        assert not ran, f"kvmem {' '.join(argv)} ran before refusing"

    run()


def test_fuzz_info_and_odd_commands(root):
    words = st.one_of(st.sampled_from(["info", "--json", "--help", "nope", "", "-", "--"]),
                      odd.paths(str(root)).filter(lambda p: isinstance(p, str)), st.just(str(root / "saved")))

    @fuzz_settings(40)
    @given(argv=st.lists(words, max_size=4))
    def run(argv):
        ok, code = attempt("cli", f"kvmem {' '.join(map(repr, argv))}", lambda: _run(argv),
                           refused=lambda code: code == 2)
        assert code in (0, 2), f"kvmem {argv!r} exited {code}"
        assert not (root / "kvmem-bench").exists()

    run()
    assert TALLY["cli"]["escapes"] == 0
