"""The commands of docs/deployment.md's "Try it on one machine", read from the document.

The tutorial test (``tests/test_deploy_tutorial.py``) and ``benchmarks/deployment_latency.py
--tutorial`` run exactly these, so the document cannot drift from what is tested.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

SECTION = "## Try it on one machine"


@dataclass
class Tutorial:
    """The tutorial's shell lines: set-up (run in order), the server and the hospitals."""

    setup: list[str] = field(default_factory=list)
    server: list[str] = field(default_factory=list)  # argv after ``fedrg``
    clients: list[list[str]] = field(default_factory=list)


def _logical_lines(block: str) -> list[str]:
    """Lines of a shell block with backslash continuations joined, comments and blanks dropped."""
    out: list[str] = []
    current = ""
    for raw in block.splitlines():
        line = raw.rstrip()
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        words = shlex.split(current, comments=True)
        if words:
            out.append(" ".join(shlex.quote(w) if not set(w) & set(">|<") else w
                                for w in words))
        current = ""
    return out


def read_tutorial(doc: str | Path) -> Tutorial:
    """Parse the first ``bash`` block of the "Try it on one machine" section of ``doc``.

    Raises
    ------
    ValueError
        The section, its code block, the server command or a client command is missing.
    """
    text = Path(doc).read_text()
    start = text.find(SECTION)
    if start == -1:
        raise ValueError(f"{doc}: no section {SECTION!r}")
    begin = text.find("```bash\n", start)
    end = text.find("\n```", begin + 1)
    if begin == -1 or end == -1:
        raise ValueError(f"{doc}: no ```bash block under {SECTION!r}")
    tutorial = Tutorial()
    for line in _logical_lines(text[begin + len("```bash\n"):end]):
        words = shlex.split(line)
        if words[:2] == ["fedrg", "server"]:
            tutorial.server = words[1:]
        elif words[:2] == ["fedrg", "client"]:
            tutorial.clients.append(words[1:])
        else:
            tutorial.setup.append(line)
    if not tutorial.server or not tutorial.clients:
        raise ValueError(f"{doc}: the tutorial block has no `fedrg server` or `fedrg client`")
    return tutorial


def tutorial_workdir(source: str | Path, root: str | Path, *, port: int) -> Path:
    """A directory to run the tutorial in: a copy of ``source/configs`` with the example
    configs' port 9092 replaced by ``port`` (another process may hold 9092)."""
    import shutil

    root = Path(root)
    root.mkdir(parents=True)
    shutil.copytree(Path(source) / "configs", root / "configs")
    for name in ("server.example.toml", "hospital.example.toml"):
        path = root / "configs" / name
        text = path.read_text()
        if "9092" not in text:
            raise ValueError(f"{path}: port 9092 not found")
        path.write_text(text.replace("9092", str(port)))
    return root
