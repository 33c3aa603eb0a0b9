"""Safe loading: no pickle, torch.load only with weights_only=True, yaml.safe_load only,
remote code only when a recipe says trust_remote_code: true."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from plugin_registries import registries

PACKAGE = Path(__file__).parent.parent / "surgery"


# name -> (forbidden pattern, allowed form on the same line or None), checked on every source line
RULES = {
    "pickle": (r"\bimport pickle\b|\bfrom pickle\b|\bpickle\.|\bcPickle\b|\bdill\b", None),
    "torch.load": (r"torch\.load\(", r"weights_only\s*=\s*True"),
    "yaml": (r"(?<!\w)yaml\.(load|unsafe_load|full_load)\(|yaml\.Loader\b|UnsafeLoader|FullLoader", None),
    "eval": (r"(?<![\w.])(eval|exec)\(", None),
    "numpy": (r"\bnp\.load\(|\bnumpy\.load\(", r"allow_pickle\s*=\s*False"),
    "shell": (r"shell\s*=\s*True|\bos\.system\(|\bos\.popen\(", None),
    "remote code": (r"trust_remote_code\s*=\s*True", None),
}


def source_lines(root: Path = PACKAGE):
    for path in sorted(root.rglob("*.py")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if code.strip():
                yield f"{path.relative_to(root.parent)}:{number}", code


def offending(rule: str, root: Path = PACKAGE) -> list[str]:
    pattern, allowed = RULES[rule]
    found = []
    for where, code in source_lines(root):
        if re.search(pattern, code) and not (allowed and re.search(allowed, code)):
            found.append(f"{where}: {code.strip()}")
    return found


PLANTED = {  # rule -> (a line it must flag, a line it must let through)
    "pickle": ("import pickle", "pickled = False"),
    "torch.load": ("state = torch.load(path)", "state = torch.load(path, weights_only=True)"),
    "yaml": ("data = yaml.load(text, Loader=yaml.Loader)", "data = yaml.safe_load(text)"),
    "eval": ("value = eval(text)", "model.eval()"),
    "numpy": ("array = np.load(path)", "array = np.load(path, allow_pickle=False)"),
    "shell": ("subprocess.run(command, shell=True)", "subprocess.run([\"git\", \"status\"])"),
    "remote code": ("AutoModel.from_pretrained(path, trust_remote_code=True)",
                    "AutoModel.from_pretrained(path, trust_remote_code=spec.trust_remote_code)"),
}


@pytest.mark.parametrize("rule", sorted(RULES))
def test_each_rule_flags_a_planted_offence_and_only_it(rule, tmp_path):
    """The scan reads nested modules and reports the offending line, not its allowed neighbour."""
    bad, good = PLANTED[rule]
    package = tmp_path / "pkg" / "sub"
    package.mkdir(parents=True)
    (package / "mod.py").write_text(f"{good}\n{bad}  # a comment does not hide it\n# {bad}\n")
    assert offending(rule, tmp_path / "pkg") == [f"pkg/sub/mod.py:2: {bad}"]


def test_package_sources_are_scanned():
    scanned = {where.split(":")[0] for where, _ in source_lines()}
    assert {"surgery/cli.py", "surgery/runtime/runner.py", "surgery/models/loading.py"} <= scanned


def test_no_pickle():
    assert offending("pickle") == []


def test_torch_load_only_weights_only():
    assert offending("torch.load") == []


def test_yaml_safe_load_only():
    assert offending("yaml") == []


def test_no_eval_or_exec():
    assert offending("eval") == []


def test_remote_code_never_trusted_by_default():
    assert offending("remote code") == []
    models = (PACKAGE / "models" / "loading.py").read_text()
    assert "trust_remote_code: bool = False" in models


def test_numpy_never_unpickles():
    assert offending("numpy") == []


def test_no_shell_commands():
    assert offending("shell") == []


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
