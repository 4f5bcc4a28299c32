"""Helpers of `.ci/mutation`, run inside one module's scratch copy.

    python mutation_tools.py config TARGET TEST...      appends the [tool.mutmut] table to pyproject.toml
    python mutation_tools.py sample TARGET N SEED       prints N of TARGET's generated mutants, reproducibly
    python mutation_tools.py summary MODULE [NAME...]   the score (of the named mutants, or of all)

The score counts killed and crashed mutants as caught and "no tests" as survived; it leaves out timeouts
(mutmut's limit is wall-clock time, so on a loaded machine a timeout may be a slow survivor) and lists them.
With a sample, its 95% Wilson interval is printed beside it.
"""

import collections
import json
import math
import os
import pathlib
import random
import subprocess
import sys

CAUGHT = ("killed", "segfault")
UNDECIDED = ("not checked", "timeout")


def config(target, tests):
    """Keeps the test ids that exist in this tree (a class must be defined or assigned in its file) and the
    pytest options (`--deselect=ID`), then writes the mutmut table; the ids left out are printed to stderr."""
    kept = []
    for test in tests:
        path, _, rest = test.partition("::")
        file = pathlib.Path(path)
        name = rest.split("::")[0]
        present = test.startswith("-") or file.exists() and (
            not rest or any(f"{word} {name}" in file.read_text() for word in ("class", "def")) or
            f"{name} = " in file.read_text())
        if present:
            kept.append(test)
        else:
            print(f"    {test} is not in this tree: left out", file=sys.stderr)
    if not kept:
        sys.exit(f"no test of {tests} is in this tree")
    with open("pyproject.toml", "a") as f:
        f.write("\n[tool.mutmut]\n"
                'source_paths = ["kvmem/"]\n'
                f"only_mutate = {json.dumps([target])}\n"
                f"pytest_add_cli_args_test_selection = {json.dumps(kept)}\n"
                'pytest_add_cli_args = ["-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly"]\n'
                # a mutant's wall-clock limit: (its tests' traced time + 1 s) x 2 x this (mutmut's default 15)
                f"timeout_multiplier = {float(os.environ.get('KVMEM_MUTATION_TIMEOUT', 15))}\n")
    print(" ".join(t for t in kept if not t.startswith("-")), f"({sum(t.startswith('-') for t in kept)} deselected)")


def sample(target, n, seed):
    """N names drawn with random.Random(SEED) from the sorted names mutmut generated for TARGET."""
    meta = json.loads(pathlib.Path("mutants", target + ".meta").read_text())
    names = sorted(meta["exit_code_by_key"])
    if not names:
        sys.exit(f"mutmut generated no mutant of {target}")
    print("\n".join(random.Random(seed).sample(names, min(n, len(names)))))


def wilson(caught, n, z=1.96):
    """The 95% Wilson score interval of a proportion caught / n."""
    p = caught / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def summary(module, names):
    out = subprocess.run(["mutmut", "results", "--all", "true"], capture_output=True, text=True).stdout
    status = dict(line.strip().rsplit(": ", 1) for line in out.splitlines() if ": " in line)
    generated = len(status)
    if names:
        status = {name: status.get(name, "not checked") for name in names}
    counts = collections.Counter(status.values())
    checked = sum(v for k, v in counts.items() if k not in UNDECIDED)
    caught = sum(counts[k] for k in CAUGHT)
    if not checked:
        print(f"{module}: no mutant checked ({generated} generated; see mutmut-run.log)")
        return
    low, high = wilson(caught, checked)
    what = f"sample of {len(status)} of {generated} mutants" if names else f"all {generated} mutants"
    print(f"{module}: {caught / checked:.1%} caught, 95% interval {low:.1%}-{high:.1%} "
          f"({caught} of {checked} decided; {what}; {dict(counts)})")
    for name, result in sorted(status.items()):
        if result not in CAUGHT:
            print(f"    {name}: {result}")


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "config":
        config(args[0], args[1:])
    elif command == "sample":
        sample(args[0], int(args[1]), int(args[2]))
    elif command == "summary":
        summary(args[0], args[1:])
    else:
        sys.exit(f"unknown command {command!r}")
