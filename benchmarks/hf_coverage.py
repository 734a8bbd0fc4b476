"""Coverage table of the transformers families, from the tests' own results.

Runs tests/test_transformers_families.py with ``SORTEDNET_COVERAGE`` set (each
test appends ``{"family", "check"}`` for what passed), then writes
benchmarks/results/hf_coverage.json and hf_coverage.md, and replaces the
table between the coverage markers in docs/transformers.md.

    .venv/bin/python benchmarks/hf_coverage.py            # run the tests, then render
    .venv/bin/python benchmarks/hf_coverage.py --render   # render the last results only
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
CHECKS = ["ffn", "heads", "depth", "heads-sliced export loads", "from_pretrained (fresh process)",
          "generate live == export", "SoFT", "importance sorting"]
BEGIN, END = "<!-- coverage:begin -->", "<!-- coverage:end -->"


def run_tests() -> dict[str, list[str]]:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "coverage.jsonl")
        env = {**os.environ, "SORTEDNET_COVERAGE": path}
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               "tests/test_transformers_families.py"], cwd=ROOT, env=env)
        rows = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    passed: dict[str, list[str]] = {}
    for r in rows:
        passed.setdefault(r["family"], [])
        if r["check"] not in passed[r["family"]]:
            passed[r["family"]].append(r["check"])
    out = {"pytest_exit_code": proc.returncode, "passed": passed}
    with open(os.path.join(RESULTS, "hf_coverage.json"), "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)
    return passed


def table(passed: dict[str, list[str]]) -> str:
    head = "| family | " + " | ".join(CHECKS) + " |\n|---|" + "---|" * len(CHECKS) + "\n"
    return head + "".join(f"| {fam} | " + " | ".join("yes" if c in got else "—" for c in CHECKS) + " |\n"
                          for fam, got in sorted(passed.items()))


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Run tests/test_transformers_families.py and write the coverage "
                                             "table (benchmarks/results/hf_coverage.*, and the table in "
                                             "docs/transformers.md)")
    ap.add_argument("--render", action="store_true", help="render the last results only (run no test)")
    if not ap.parse_args().render:
        run_tests()
    with open(os.path.join(RESULTS, "hf_coverage.json")) as f:
        saved = json.load(f)
    passed, code = saved["passed"], saved.get("pytest_exit_code")
    md = table(passed)
    status = ("every test passed" if code == 0 else
              f"pytest exited with code {code}: SOME TESTS FAILED, and a check whose test failed is not listed")
    with open(os.path.join(RESULTS, "hf_coverage.md"), "w") as f:
        f.write("# transformers families: what the tests checked\n\n"
                f"Written by `python benchmarks/hf_coverage.py` from a run of tests/test_transformers_families.py "
                f"({status}). `importance sorting` covers the dimensions the family's nest has (the FFN alone where "
                "its heads are not sliced).\n\n" + md)
    doc = os.path.join(ROOT, "docs", "transformers.md")
    with open(doc) as f:
        text = f.read()
    if BEGIN in text and END in text:
        pre, rest = text.split(BEGIN, 1)
        text = pre + BEGIN + "\n" + md + END + rest.split(END, 1)[1]
        with open(doc, "w") as f:
            f.write(text)
    print(md)


if __name__ == "__main__":
    main()
