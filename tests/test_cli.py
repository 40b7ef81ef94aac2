"""The command line: usage errors and the demo end to end."""

import subprocess
import sys

import pytest

from audit.cli import main


def test_unknown_command_is_a_usage_error(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "demo" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_runs_end_to_end_and_shows_the_shortcut(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "audit", "demo", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "demo_model.keras").exists()
    assert (tmp_path / "audit_data" / "manifest.csv").exists()
    assert len(list((tmp_path / "overlays").glob("*.png"))) == 30
    lines = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.strip()}
    # Columns: class n accuracy object_mass object_lift background_mass [shortcut]
    object_mass = {digit: float(lines[digit][3]) for digit in "0123456789"}
    clean = [object_mass[d] for d in "01245689"]
    assert object_mass["7"] < min(clean)
    assert object_mass["3"] < sorted(clean)[len(clean) // 2]
