"""Hostile input on the CLI: one clear line on stderr, exit status 2, nothing loaded or left behind.

Issue #11, items 17-20. Each case runs the real ``esr-lab`` in a subprocess (non-UTF-8 bytes
reach it as they would from a shell) with an empty cache, so "rejected before the model
loaded" is checked by the cache staying empty: no de-quantised model copy is ever written.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from esr_core.io import read_jsonl, seal_log

REPO = Path(__file__).resolve().parent.parent
REF = REPO / "assets" / "experiments" / "reference"
SAE = REPO / "assets" / "sae" / "smollm2-135m-instruct"


def esr_lab(args: list, tmp_path: Path, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "ESR_LAB_CACHE": str(tmp_path / "cache"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "esr_core.cli", *args], cwd=REPO, env=env, input=stdin,
                          capture_output=True, timeout=600)


def one_clear_line(res: subprocess.CompletedProcess, *needles: str) -> str:
    err = res.stderr.decode("utf-8", "replace").strip()
    assert res.returncode == 2, (res.returncode, err[-2000:])
    assert "Traceback" not in err and len(err.splitlines()) == 1, err[-2000:]
    assert err.startswith("esr-lab: error: ")
    for n in needles:
        assert n in err, err
    return err


def nothing_loaded(tmp_path: Path) -> None:
    assert not (tmp_path / "cache" / "models").exists(), "the model was loaded before the input was checked"


# ----------------------------------------------------------------------------- 17: bytes that are not UTF-8


def test_generate_rejects_a_non_utf8_prompt(tmp_path):
    res = esr_lab(["generate", "--prompt", b"caf\xe9 au lait?"], tmp_path)
    one_clear_line(res, "--prompt", "UTF-8")
    assert res.stdout == b""
    nothing_loaded(tmp_path)


def test_judge_rejects_non_utf8_files_and_stdin(tmp_path):
    bad = tmp_path / "prompt.txt"
    bad.write_bytes(b"How do I boil an \xff\xfe egg?")
    one_clear_line(esr_lab(["judge", "--prompt", f"@{bad}", "--response", "Boil it."], tmp_path),
                   "prompt.txt", "UTF-8")
    one_clear_line(esr_lab(["judge", "--prompt", "Boil an egg?", "--response", "-"], tmp_path,
                           stdin=b"Put it in \xe9 water"), "stdin", "UTF-8")
    one_clear_line(esr_lab(["judge", "--prompt", f"@{tmp_path / 'missing.txt'}", "--response", "x"], tmp_path),
                   "missing.txt")


def test_experiment_config_that_is_not_utf8(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_bytes(b'{"name": "caf\xe9"}')
    one_clear_line(esr_lab(["experiment", "run", "--config", str(cfg), "--out", str(tmp_path / "run")], tmp_path),
                   "config.json", "UTF-8")
    assert not (tmp_path / "run").exists()


def test_sae_metadata_that_is_not_utf8(tmp_path):
    sae = tmp_path / "sae"
    shutil.copytree(SAE, sae)
    (sae / "esr_meta.json").write_bytes(b'{"note": "\xff"}')
    one_clear_line(esr_lab(["generate", "--prompt", "Hi", "--sae", str(sae)], tmp_path), "esr_meta.json", "UTF-8")
    nothing_loaded(tmp_path)


# ----------------------------------------------------------------------------- 18: configs with wrong types


@pytest.mark.parametrize("setting, value, words", [
    ("temperature", "hot", "'temperature' must be a number"),
    ("calib_lo", "a", "'calib_lo' must be a number"),
    ("meta_variants", 5, "'meta_variants' must be a list of strings"),
    ("latents", "abc", "'latents' must be a list of integers"),
    ("conditions", "steering", "'conditions' must be a list of strings"),
])
def test_experiment_config_with_wrong_types(tmp_path, setting, value, words):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"name": "typed", setting: value}))
    res = esr_lab(["experiment", "run", "--config", str(cfg), "--out", str(tmp_path / "run")], tmp_path)
    one_clear_line(res, words)
    assert not (tmp_path / "run").exists()  # no empty run folder left behind
    nothing_loaded(tmp_path)


def test_a_run_that_fails_before_its_spec_is_saved_leaves_no_folder(tmp_path):
    """Valid types, but a prompt id the prompt set lacks: found while resolving, folder removed."""
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"name": "ghost", "prompt_ids": ["no-such-prompt"], "latents": [5],
                               "boost_mode": "fixed", "boost": 1.0, "max_new_tokens": 4}))
    one_clear_line(esr_lab(["experiment", "run", "--config", str(cfg), "--out", str(tmp_path / "run")], tmp_path),
                   "no-such-prompt")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- 19: checked before the model loads


@pytest.mark.parametrize("args, words", [
    (["--steer", "99999:1"], "99999 is out of range"),
    (["--steer", "5:nan"], "finite"),
    (["--clamp", "5:inf"], "finite"),
    (["--watch", "123456"], "out of range"),
    (["--sae", "/no/such/sae"], "does not exist"),
    (["--model", "does-not-exist"], "Unknown model 'does-not-exist'"),
    (["--model", "does-not-exist", "--sae", str(SAE)], "Unknown model 'does-not-exist'"),
    (["--model", "someone/not-cached-model", "--sae", str(SAE)], "not available offline"),
])
def test_generate_rejects_bad_requests_before_loading_the_model(tmp_path, args, words):
    res = esr_lab(["generate", "--prompt", "How do I boil an egg?", *args], tmp_path)
    one_clear_line(res, words)
    assert res.stdout == b""  # no header lines before the error
    nothing_loaded(tmp_path)


# ----------------------------------------------------------------------------- 20: torn experiment logs


def test_torn_multibyte_and_non_object_log_lines_are_skipped(tmp_path):
    log = tmp_path / "trials.jsonl"
    good = [{"key": f"k{i}", "text": "café ☕"} for i in range(3)]
    with open(log, "wb") as f:
        for r in good:
            f.write(json.dumps(r, ensure_ascii=False).encode() + b"\n")
        f.write(b"[1, 2, 3]\n")  # valid JSON, not an object
        f.write(b'"just a string"\n')
        f.write('{"key": "k3", "text": "caf'.encode() + "é".encode()[:1])  # cut inside a 2-byte character
    assert [r["key"] for r in read_jsonl(log)] == ["k0", "k1", "k2"]
    seal_log(log)
    raw = log.read_bytes()
    assert raw.endswith(b'"just a string"\n')  # the torn bytes are gone, not ended with a newline
    raw.decode("utf-8")  # and the file is valid UTF-8 again
    seal_log(log)
    assert log.read_bytes() == raw  # sealing a clean log changes nothing


def test_summary_of_a_run_whose_last_log_line_is_torn(tmp_path):
    import pandas as pd

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(REF / "spec.json", run / "spec.json")
    df = pd.read_parquet(REF / "trials.parquet").head(20)
    with open(run / "trials.jsonl", "wb") as f:
        for rec in json.loads(df.to_json(orient="records")):
            rec["attempts"] = json.loads(rec["attempts"]) if isinstance(rec["attempts"], str) else rec["attempts"]
            f.write(json.dumps(rec, ensure_ascii=False).encode() + b"\n")
        f.write(b"42\n")
        f.write('{"key": "x", "response": "\u2603'.encode()[:-1])
    res = esr_lab(["experiment", "summary", str(run), "--json"], tmp_path)
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    assert json.loads(res.stdout)["n_trials"] == 20


@pytest.mark.parametrize("args, needles", [
    (["detectors", "token-search", "--inputs", "missing.jsonl"], ["do not exist", "esr-lab detectors inputs"]),
    (["detectors", "token-search", "--n-prompts", "2"], ["at least 6 prompts"]),
    (["detectors", "attribute", "--run", "."], ["not an experiment run folder"]),
    (["detectors", "inputs", "--data", "."], ["lacks answers.jsonl", "esr-lab finetune data"]),
    (["detectors", "inputs"], ["--data", "--live"]),
    (["detectors", "separation", "--record"], ["--record", "--group"]),
    (["detectors", "separation", "--run", "."], ["not an experiment run folder"]),
    (["detectors", "inputs", "--live", "--boost-range", "0.6,0.2"], ["boost range", "0 < LO <= HI"]),
    (["detectors", "inputs", "--live", "--boost-range", "nan,1"], ["boost range"]),
    (["detectors", "inputs", "--live", "--latents", "12,x"], ["comma-separated integers"]),
])
def test_detector_commands_check_their_input_before_loading_a_model(tmp_path, args, needles):
    """#13's commands: one clear line, exit status 2, and no model loaded for bad input."""
    one_clear_line(esr_lab(args, tmp_path), *needles)
    nothing_loaded(tmp_path)


def test_a_model_folder_save_that_crashes_leaves_the_old_folder_whole(tmp_path):
    """save_pretrained_atomically writes into a temp sibling: a part that fails mid-save leaves
    the previous folder as it was, and a good save replaces it whole."""
    from esr_core.io import save_pretrained_atomically

    class Part:
        def __init__(self, name, fail=False):
            self.name, self.fail = name, fail

        def save_pretrained(self, folder):
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / self.name).write_text(self.name)
            if self.fail:
                raise OSError("disk full")

    out = tmp_path / "model"
    save_pretrained_atomically(out, Part("weights"), Part("tokenizer"))
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer", "weights"]
    with pytest.raises(OSError):
        save_pretrained_atomically(out, Part("new-weights"), Part("new-tokenizer", fail=True))
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer", "weights"]
    save_pretrained_atomically(out, Part("v2"))
    assert [p.name for p in out.iterdir()] == ["v2"]
