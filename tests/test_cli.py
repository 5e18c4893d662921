import os
import subprocess
import sys
from pathlib import Path

import pytest

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


USER_ERRORS = {  # argv -> the start of the one error line; each must answer before torch is imported
    "train-config": (["train", "--config", "nope.yaml"], "error: cannot read config nope.yaml"),
    "train-key": (["train", "-c", "configs/smoke.yaml", "--set", "train.lrr=1"],
                  "error: --set train.lrr: unknown key; did you mean train.lr?"),
    "train-resume": (["train", "--resume", "nope"], "error: run folder not found: nope"),
    "evaluate-run": (["evaluate", "--run", "nope", "--labels", "configs/smoke.yaml", "--images", ".", "--out", "o"],
                     "error: run folder not found: nope"),
    "evaluate-labels": (["evaluate", "--run", "nope", "--labels", "nope.csv", "--images", ".", "--out", "o"],
                        "error: labels CSV not found: nope.csv"),
    "calibrate-run": (["calibrate", "--run", "nope"], "error: run folder not found: nope"),
    "calibrate-data-root": (["calibrate", "--run", "medvit/resources/demo", "--data-root", "nope"],
                            "error: --data-root nope: folder not found"),
}


@pytest.mark.parametrize("case", sorted(USER_ERRORS))
def test_user_errors_answer_before_torch_is_imported(case):
    argv, expected = USER_ERRORS[case]
    code = ("import sys; from medvit.cli import main; rc = main(sys.argv[1:]); "
            "print(rc, 'torch' in sys.modules)")
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120, cwd=root)
    assert r.stdout.split() == ["2", "False"], r.stderr
    assert r.stderr.strip().startswith(expected) and "\n" not in r.stderr.strip()


def test_review_help_does_not_import_torch():
    code = "import sys; from medvit.cli import build_parser; build_parser('review'); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          timeout=120).stdout.strip() == "False"


def test_offline_flag_before_or_after_the_command_sets_the_hub_variables():
    code = ("import os, sys; from medvit.cli import main; main(sys.argv[1:]); "
            "print(os.environ.get('HF_HUB_OFFLINE'), os.environ.get('TRANSFORMERS_OFFLINE'), "
            "os.environ.get('MEDVIT_OFFLINE'))")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "MEDVIT_OFFLINE")}
    for argv in (["--offline", "calibrate", "--run", "nope"], ["calibrate", "--offline", "--run", "nope"]):
        r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, timeout=120)
        assert r.stdout.split() == ["1", "1", "1"], r.stderr
    r = subprocess.run([sys.executable, "-c", code, "calibrate", "--run", "nope"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.stdout.split() == ["None", "None", "None"]
