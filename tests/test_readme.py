"""The README's "Any Flax model" examples run exactly as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_any_flax_model_examples_run_verbatim(capsys):
    text = README.read_text()
    section = text.split("## Any Flax model", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
    assert capsys.readouterr().out == "trainable params: 192 || all params: 1,264 || trainable%: 15.1899\n"
