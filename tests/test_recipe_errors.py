"""Recipe errors outside the malformed-input corpus.

Every malformed recipe, data file, model and SAE folder is a case of tests/bad_inputs/cases.yaml,
run by tests/bad_inputs/test_bad_inputs.py. What stays here is what the corpus cannot express.
"""
from __future__ import annotations

import pytest


def test_missing_recipe_file_message(tmp_path, surgery_cli):
    result = surgery_cli("validate", tmp_path / "nope.yaml")
    assert result.exit_code == 2
    assert result.err.strip() == f"error: {tmp_path / 'nope.yaml'}: recipe file not found"


def test_debug_shows_traceback(tmp_path, surgery_cli):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: [\n")
    with pytest.raises(Exception):
        surgery_cli("--debug", "validate", recipe)


def test_multi_line_messages_are_printed_on_one_line(tmp_path, surgery_cli):
    (tmp_path / "noisy.py").write_text(
        "from surgery import hookimpl\nfrom surgery.core.errors import SurgeryError\nPLUGIN_NAME = 'noisy'\n"
        "@hookimpl\ndef evaluate(ctx):\n    raise SurgeryError('first line\\n\\n  second line\\n')\n"
    )
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"plugins: [./noisy.py]\nsteps:\n  - evaluate: {{plugin: noisy}}\noutput: {tmp_path / 'run'}\n")
    result = surgery_cli("run", recipe)
    assert result.exit_code == 2
    assert result.err.strip() == f"error: {recipe}: step 0 (evaluate: noisy): first line | second line"
    assert not (tmp_path / "run").exists()
