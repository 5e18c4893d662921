import subprocess
import sys

from medvit.cli import COMMANDS, main


def test_help_lists_every_subcommand(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "medvit", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "train" in r.stdout


def test_unknown_option_is_one_line_exit_2(capsys):
    assert main(["data", "check", "--bogus"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err


def test_data_check_on_dev_set(dev_labels, dev_images, capsys):
    assert main(["data", "check", "--labels", str(dev_labels), "--images", str(dev_images)]) == 0
    out = capsys.readouterr().out
    assert "337 images, 337 patients" in out and "patient overlap between splits: none" in out
    assert "missing image files: 0" in out


def test_data_check_missing_csv_is_user_error(tmp_path, capsys):
    assert main(["data", "check", "--labels", str(tmp_path / "x.csv"), "--images", str(tmp_path)]) == 2
    assert "labels CSV not found" in capsys.readouterr().err
