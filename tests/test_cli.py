"""The command line: verbs with --help, and one clear line with exit status 2 for bad input."""
from __future__ import annotations

import subprocess
import sys

import pytest
from tiny import tiny_model

from autocompress.artifacts import read_artifact
from autocompress.cli import main


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    """A tiny Llama saved as an ordinary Hugging Face directory, with its tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture()
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("\n\n".join(f"Paragraph {i} tells how the function returns a value." * 5 for i in range(40)))
    return path


def _one_line_error(capsys, argv, needle):
    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err and needle in err, err


def test_eval_runs_on_a_local_directory_and_writes_eval_json(tiny_dir, text_file, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = main(["eval", str(tiny_dir), "--data", str(text_file), "--split", "calibration",
                 "--tokens", "256", "--window", "64", "--decode-tokens", "2", "--out", str(out), "--threads", "1"])
    assert code == 0
    assert "perplexity" in capsys.readouterr().out
    assert read_artifact(out, "eval", 1)["tokens"] == 256


def test_wrong_model_path(capsys, tmp_path):
    _one_line_error(capsys, ["eval", str(tmp_path / "nowhere" / "model.gguf")], "does not exist")
    _one_line_error(capsys, ["eval", str(tmp_path)], "no config.json")


def test_unknown_alias(capsys):
    _one_line_error(capsys, ["eval", "smollm9-1t"], "not an alias")


def test_unreadable_and_empty_data(capsys, tiny_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _one_line_error(capsys, ["eval", str(tiny_dir), "--data", str(empty)], "holds no text")
    _one_line_error(capsys, ["eval", str(tiny_dir), "--data", str(tmp_path / "missing.jsonl")], "not found")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00\x01")
    _one_line_error(capsys, ["eval", str(tiny_dir), "--data", str(binary)], "not UTF-8")


def test_bad_option(capsys, tiny_dir):
    _one_line_error(capsys, ["eval", str(tiny_dir), "--tokens", "many"], "--tokens")
    _one_line_error(capsys, ["eval", str(tiny_dir), "--no-such-option"], "unrecognized arguments")


def test_help_of_every_verb_and_python_dash_m():
    for argv in (["--help"], ["eval", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
    result = subprocess.run([sys.executable, "-m", "autocompress", "eval", "/no/such/model.gguf"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
