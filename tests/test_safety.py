"""Safe loading: no pickle, torch.load only with weights_only=True, yaml.safe_load only,
remote code only when a recipe says trust_remote_code: true."""
from __future__ import annotations

import re
from pathlib import Path

from plugin_registries import registries

PACKAGE = Path(__file__).parent.parent / "surgery"


def source_lines():
    for path in sorted(PACKAGE.rglob("*.py")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if code.strip():
                yield f"{path.relative_to(PACKAGE.parent)}:{number}", code


def offending(pattern: str, allowed: str | None = None) -> list[str]:
    found = []
    for where, code in source_lines():
        if re.search(pattern, code) and not (allowed and re.search(allowed, code)):
            found.append(f"{where}: {code.strip()}")
    return found


def test_package_has_sources():
    assert len(list(PACKAGE.rglob("*.py"))) > 10


def test_no_pickle():
    assert offending(r"\bimport pickle\b|\bfrom pickle\b|\bpickle\.|\bcPickle\b|\bdill\b") == []


def test_torch_load_only_weights_only():
    assert offending(r"torch\.load\(", allowed=r"weights_only\s*=\s*True") == []


def test_yaml_safe_load_only():
    assert offending(r"(?<!\w)yaml\.(load|unsafe_load|full_load)\(|yaml\.Loader\b|UnsafeLoader|FullLoader") == []


def test_no_eval_or_exec():
    assert offending(r"(?<![\w.])(eval|exec)\(") == []


def test_remote_code_never_trusted_by_default():
    hits = offending(r"trust_remote_code\s*=\s*True")
    assert hits == []
    models = (PACKAGE / "models" / "loading.py").read_text()
    assert "trust_remote_code: bool = False" in models


def test_numpy_never_unpickles():
    assert offending(r"\bnp\.load\(|\bnumpy\.load\(", allowed=r"allow_pickle\s*=\s*False") == []


def test_no_shell_commands():
    assert offending(r"shell\s*=\s*True|\bos\.system\(|\bos\.popen\(") == []


def test_tokenizers_get_the_recipe_trust_flag():
    models = (PACKAGE / "models" / "loading.py").read_text()
    assert "AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code," in models
    assert "_load_tokenizer(path, spec.trust_remote_code, offline)" in models


def test_loading_is_local_only_unless_downloads_are_allowed():
    models = (PACKAGE / "models" / "loading.py").read_text()
    assert models.count("local_files_only=offline") == 2  # config and tokenizer
    assert 'kwargs["local_files_only"] = True' in models  # weights


REMOTE_CODE = Path(__file__).parent / "bad_inputs" / "models" / "remote-code"


def test_remote_code_runs_only_when_the_recipe_trusts_it(tmp_path, monkeypatch):
    """A checkpoint whose config maps to its own Python file: refused (the file never imported)
    unless its spec says trust_remote_code: true, when the file is imported."""
    import pytest

    from surgery.core.errors import ModelError
    from surgery.models.loading import ModelSpec, load_model

    checkpoint = tmp_path / "remote-code"
    checkpoint.mkdir()
    for file in REMOTE_CODE.iterdir():
        (checkpoint / file.name).write_text(file.read_text())
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(ModelError, match="custom code.*trust_remote_code: true"):
        load_model("m", ModelSpec(path=str(checkpoint)), registries())
    assert not (work / "remote-code-ran").exists()
    import sys

    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # not the user's cache
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    try:
        with pytest.raises(ModelError):  # the code runs, then fails: it defines no real model
            load_model("m", ModelSpec(path=str(checkpoint), trust_remote_code=True), registries())
    finally:
        for name in set(sys.modules) - before:
            if name.startswith("transformers_modules"):
                del sys.modules[name]
    assert (work / "remote-code-ran").exists()
