"""Prints the fuzz suite's tally (kvmem.testing.fuzz) at the end of a run that fuzzed."""

import sys


def pytest_terminal_summary(terminalreporter):
    fuzz = sys.modules.get("kvmem.testing.fuzz")
    text = fuzz.summary() if fuzz is not None else ""
    if text:
        terminalreporter.write_sep("-", "kvmem fuzz: calls drawn, InvalidInputError, accepted, escapes")
        terminalreporter.write_line(text)
