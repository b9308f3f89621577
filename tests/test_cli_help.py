"""`prunecascade --help`, `--version` and `methods`: a user's first commands. They must describe every
command, and answer without importing torch or FAISS (that is what made `methods` take 16.8 s)."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version

import pytest

from lab import run_tuples as tuples_command
from lab.tuples import DEFAULT_AGGREGATORS
from models.gadget import GADGET_KINDS
from models.pruning import list_methods
from models.pruning.budgets import BUDGET_RULES
from service.cli import COMMANDS, build_parser, main
from service.commands import gadget as gadget_command
from service.commands import prune as prune_command
from service.commands.methods import scan_methods

HEAVY = ("torch", "faiss", "numpy", "cascade.engine", "uvicorn")


def _run_cli(*argv: str) -> tuple[str, set[str]]:
    """Runs the CLI in a fresh interpreter; returns its stdout and which heavy modules it imported."""
    code = (
        "import sys\nfrom service.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        f"print('IMPORTED', *sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    out, _, imported = done.stdout.rpartition("IMPORTED")
    return out, set(imported.split())


def test_help_describes_every_command_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    for name, summary in COMMANDS.items():
        assert summary and len(summary) < 70, name
        assert any(line.split()[:1] == [name] and summary in line for line in lines), f"{name} not listed"
    assert "--home" in text and "--dataset" in text  # says what a home is and how to bring one's own data


def test_version_comes_from_the_package_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"prunecascade {version('prunecascade')}"


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["methods"], ["bootstrap", "--help"]])
def test_help_version_and_methods_import_no_heavy_module(argv: list[str]) -> None:
    out, imported = _run_cli(*argv)
    assert out.strip(), "no output"
    assert imported == set(), f"`prunecascade {' '.join(argv)}` imported {sorted(imported)}"


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_parses_its_own_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser(name).parse_args([name, "--help"])
    assert exc.value.code == 0
    assert f"usage: prunecascade {name}" in capsys.readouterr().out


def test_an_unknown_command_is_a_usage_error_listing_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bogus"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'bogus'" in err and all(name in err for name in COMMANDS)


def test_methods_lists_exactly_the_registered_methods(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names == [m.name for m in list_methods()]


@pytest.mark.parametrize("method", list_methods(), ids=lambda m: m.name)
def test_methods_line_matches_the_registry(method, capsys: pytest.CaptureFixture[str]) -> None:
    """The listing is read from the source without importing it: kind, data needs and summary must agree."""
    assert main(["methods"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.split()[0] == method.name)
    data = "data-free" if not method.needs_data else ("labelled data" if method.needs_labels else "unlabelled data")
    assert line.split()[1] == method.kind
    assert f" {data} " in line
    assert line.rstrip().endswith(method.summary)
    scanned = {m.name: m for m in scan_methods()}[method.name]
    assert (scanned.kind, scanned.needs_data, scanned.needs_labels) == (
        method.kind,
        method.needs_data,
        method.needs_labels,
    )


def test_choices_spelled_out_for_a_fast_parser_agree_with_the_library() -> None:
    assert tuple(prune_command.BUDGETS) == tuple(BUDGET_RULES)
    assert tuple(tuples_command.AGGREGATORS) == tuple(DEFAULT_AGGREGATORS)
    assert tuple(gadget_command.KINDS) == tuple(GADGET_KINDS)
