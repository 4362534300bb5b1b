"""Every ```python block of README.md and docs/*.md runs as written, on the CPU.

Conventions for documentation code:
- A runnable block is self-contained (its own imports, tiny shapes, random or packaged data)
  and finishes in a few seconds. It runs in a fresh interpreter, in an empty folder, with
  CUDA hidden and one CPU thread.
- A block whose first line is `# fragment of: <target>` is not run. The target must name a
  runnable block, as `<file>#<anchor>` (the GitHub anchor of the heading the block sits
  under, e.g. `README.md#quick-start`), or an existing file of the repository (e.g.
  `examples/digits.py`).
- A block whose first line starts with `# torchrun` is launched as two gloo processes with
  `python -m torch.distributed.run --standalone --nproc_per_node=2`. It and the blocks that
  use torchvision are in the slow set (`pytest -m slow`).
- A block that imports an optional package (torchvision, torchdistill, ...) is skipped when
  that package is not installed.
- SOKD_DOCS_SMOKE=1 is set while the blocks run, for the rare block that must shrink itself
  under test; a block that is tiny as written needs no such branch.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FRAGMENT = re.compile(r"^# fragment of: (\S.*?)\s*$")
OPTIONAL_PACKAGES = {"torchvision", "torchdistill", "sklearn", "matplotlib", "yaml", "mlxtend"}
BLOCK_TIMEOUT_S = 300


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    anchor: str  # GitHub anchor of the nearest heading above, "" before the first heading
    code: str

    @property
    def label(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}#{self.anchor}"

    @property
    def fragment_target(self) -> str | None:
        first = self.code.split("\n", 1)[0]
        match = FRAGMENT.match(first)
        return match.group(1) if match else None

    @property
    def is_torchrun(self) -> bool:
        return self.code.startswith("# torchrun")


def github_anchor(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def parse_blocks(path: Path) -> list[Block]:
    blocks, anchor, fence, start, body = [], "", None, 0, []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        stripped = line.strip()
        if fence is None:
            if stripped.startswith("```"):
                fence, start, body = stripped[3:].strip(), number, []
            elif line.startswith("#"):
                anchor = github_anchor(line.lstrip("#"))
        elif stripped == "```":
            if fence == "python":
                blocks.append(Block(path, start, anchor, "\n".join(body) + "\n"))
            fence = None
        else:
            body.append(line)
    assert fence is None, f"{path.relative_to(ROOT)}:{start}: a code fence is never closed"
    return blocks


BLOCKS = [block for path in DOC_FILES for block in parse_blocks(path)]
RUNNABLE = [block for block in BLOCKS if block.fragment_target is None]
FRAGMENTS = [block for block in BLOCKS if block.fragment_target is not None]


def missing_optional_packages(code: str) -> list[str]:
    roots = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return sorted(r for r in roots & OPTIONAL_PACKAGES if importlib.util.find_spec(r) is None)


def block_environment() -> dict[str, str]:
    env = dict(os.environ)
    # The documented code must run on a CPU-only machine; hiding GPUs makes this machine one.
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", SOKD_DOCS_SMOKE="1")
    return env


def run_block(block: Block, folder: Path) -> subprocess.CompletedProcess:
    script = folder / "block.py"
    script.write_text(block.code)
    command = [sys.executable, str(script)]
    if block.is_torchrun:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += ["--nproc_per_node=2", str(script)]
    return subprocess.run(
        command,
        cwd=folder,
        env=block_environment(),
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT_S,
        check=False,
    )


def is_slow(block: Block) -> bool:
    """Launching two processes, or training torchvision ResNets, takes over 5 s on 2 cores."""
    return block.is_torchrun or "torchvision" in block.code


def test_the_docs_have_python_blocks():
    assert RUNNABLE, "no runnable python block found in README.md or docs/"
    assert any(block.path.name == "README.md" for block in RUNNABLE)


@pytest.mark.parametrize(
    "block",
    [
        pytest.param(block, id=block.label, marks=[pytest.mark.slow] if is_slow(block) else [])
        for block in RUNNABLE
    ],
)
def test_block_runs_as_written(block, tmp_path):
    missing = missing_optional_packages(block.code)
    if missing:
        pytest.skip(f"{block.label} needs {', '.join(missing)}, which is not installed")
    completed = run_block(block, tmp_path)
    assert completed.returncode == 0, (
        f"{block.label} failed (exit {completed.returncode}):\n"
        f"--- stdout\n{completed.stdout[-3000:]}\n--- stderr\n{completed.stderr[-6000:]}"
    )


@pytest.mark.parametrize("block", [pytest.param(b, id=b.label) for b in FRAGMENTS])
def test_fragment_names_a_runnable_block_or_a_file(block):
    target = block.fragment_target
    names = {runnable.name for runnable in RUNNABLE}
    if "#" in target:
        file_part, anchor = target.split("#", 1)
        resolved = f"{file_part or block.path.relative_to(ROOT)}#{anchor}"
        assert resolved in names, (
            f"{block.label}: '# fragment of: {target}' names no runnable block; "
            f"runnable blocks are {sorted(names)}"
        )
    else:
        assert (ROOT / target).is_file(), (
            f"{block.label}: '# fragment of: {target}' is neither <file>#<anchor> of a "
            "runnable block nor a file of the repository"
        )


def test_parser_reads_fences_headings_and_fragments(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(
        "# Title\n\n## Quick start: one script!\n\n```python\nprint(1)\n```\n\n"
        "```bash\necho no\n```\n\n### More\n\n```python\n# fragment of: README.md#quick-start\n"
        "x = 1\n```\n"
    )
    first, second = parse_blocks(doc)
    assert (first.line, first.anchor, first.code) == (5, "quick-start-one-script", "print(1)\n")
    assert first.fragment_target is None
    assert second.anchor == "more" and second.fragment_target == "README.md#quick-start"
    assert missing_optional_packages("import torch\nfrom torchvision import models\n") == (
        [] if importlib.util.find_spec("torchvision") else ["torchvision"]
    )


def public_names() -> list[str]:
    import sokd
    import sokd.ops

    ops = [
        name
        for name, value in vars(sokd.ops).items()
        if callable(value)
        and not name.startswith("_")
        and (value.__module__ == "sokd.ops" or value.__module__.startswith("sokd._ops."))
    ]
    integrations = {"Distiller", "SoKDStudent", "SoKDTorchdistillLoss"}
    return sorted(set(sokd.__all__) | set(ops) | integrations)


def test_api_reference_documents_every_public_name():
    text = (ROOT / "docs" / "api.md").read_text()
    documented = set(re.findall(r"^### `([\w.]+)`", text, re.M))
    missing = [name for name in public_names() if name not in documented]
    assert not missing, f"docs/api.md has no '### `name`' section for {missing}"


def test_every_sokd_loss_option_has_one_line_in_the_api_table_and_the_docstring():
    from sokd import SoKDLoss

    options = [name for name in inspect.signature(SoKDLoss.__init__).parameters if name != "self"]
    text = (ROOT / "docs" / "api.md").read_text()
    section = text[text.index("### `SoKDLoss`"):text.index("### `SoKDLoss.from_models`")]
    rows = re.findall(r"^\| `(\w+)` \|", section, re.M)
    # One row per option, grouped by what it controls rather than in the signature's order.
    assert sorted(rows) == sorted(options), "docs/api.md's SoKDLoss table: one row per option"
    docstring_lines = re.findall(r"^\s+(\w+): ", SoKDLoss.__doc__, re.M)
    assert [name for name in options if name not in docstring_lines] == []
