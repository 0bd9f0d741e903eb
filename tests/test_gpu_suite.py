"""scripts/gpu_suite.sh, checked on the CPU before a GPU session spends its few minutes on it: every bench command
of its stages parses its arguments, and every test it names is collected."""
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SUITE = (REPO / "scripts" / "gpu_suite.sh").read_text().replace("\\\n", " ")

# Runs each (script, arguments) of argv[1] up to its parse_args, prints what it parsed, and goes on to the next.
PARSE_ONLY = r"""
import argparse, json, runpy, sys
parse = argparse.ArgumentParser.parse_args
class Parsed(Exception):
    pass
def parse_only(self, args=None, namespace=None):
    parse(self, args, namespace)
    raise Parsed
argparse.ArgumentParser.parse_args = parse_only
for script, args in json.loads(sys.argv[1]):
    sys.argv = [script, *args]
    sys.path.insert(0, script.rsplit("/", 1)[0])
    try:
        runpy.run_path(script, run_name="__main__")
    except Parsed:
        print("parsed", script, *args)
"""


def bench_commands(tmp_path) -> list[tuple[str, list[str]]]:
    """Each stage's ``python3 bench/NAME.py ARGS``, with the optional ${..._ARGS:-} left empty and $WORK in tmp_path."""
    found = []
    for match in re.finditer(r"python3 (bench/\w+\.py)([^\n;]*)", SUITE):
        args = re.sub(r"\$\{[A-Z0-9_]+:-\}", "", match.group(2)).replace("$WORK", str(tmp_path))
        found.append((match.group(1), shlex.split(args)))
    return found


def test_every_bench_command_of_the_suite_parses(tmp_path):
    commands = bench_commands(tmp_path)
    assert {script for script, _ in commands} >= {"bench/bench_sample.py", "bench/bench_call_cost.py",
                                                  "bench/bench_decode.py"}
    done = subprocess.run([sys.executable, "-c", PARSE_ONLY, json.dumps(commands)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("parsed ") == len(commands), done.stdout + done.stderr[-3000:]


def test_every_test_the_suite_names_is_collected():
    named = sorted(set(re.findall(r"\btests/[\w/]+\.py(?:::\w+)?", SUITE)))
    assert len(named) >= 10
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider", *named],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
