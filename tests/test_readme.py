"""Every Python example in README.md runs as written (in a new process, in a scratch folder), and
prints what its comments say: a line ``print(x)  # -> VALUE (explanation)`` must print ``VALUE``."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from kvmem.testing.child import run_child

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
EXPECT = re.compile(r"^(\s*)print\((.*)\)\s+# -> (.*?)(?:\s+\(.*\))?$")
PRELUDE = """\
def _expect(want, *values):
    got = " ".join(map(str, values))
    print(got)
    assert got == want, f"README says this prints {want!r}; it printed {got!r}"
"""


def checked(code):
    """``code`` with each ``print(x)  # -> VALUE`` turned into an assertion that it prints VALUE."""
    lines = []
    for line in code.splitlines():
        m = EXPECT.match(line)
        lines.append(f"{m[1]}_expect({m[3]!r}, {m[2]})" if m else line)
    return PRELUDE + "\n".join(lines) + "\n"


def test_the_readme_has_examples():
    assert len(BLOCKS) >= 3
    assert sum(bool(EXPECT.match(line)) for code in BLOCKS for line in code.splitlines()) >= 5


def test_a_wrong_printed_value_is_caught():
    proc = subprocess.run([sys.executable, "-c", checked("print(2 + 2)  # -> 5 (arithmetic)")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "README says this prints '5'; it printed '4'" in proc.stderr


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path):
    code = BLOCKS[index]
    if "class TestMyStore" in code:
        pytest.skip("a test-class template for third-party backends, not a script")
    try:
        run_child(checked(code), timeout=600, cwd=tmp_path)
    except AssertionError as exc:
        raise AssertionError(f"README example {index} failed:\n{code}\n{str(exc)[-3000:]}") from None
