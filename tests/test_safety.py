"""Safe loading: no pickle, torch.load only with weights_only=True, yaml.safe_load only,
remote code only when a recipe says trust_remote_code: true."""
from __future__ import annotations

import re
from pathlib import Path

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
    assert offending(r"yaml\.(load|unsafe_load|full_load)\(|yaml\.Loader\b|UnsafeLoader|FullLoader") == []


def test_no_eval_or_exec():
    assert offending(r"(?<![\w.])(eval|exec)\(") == []


def test_remote_code_never_trusted_by_default():
    hits = offending(r"trust_remote_code\s*=\s*True")
    assert hits == []
    models = (PACKAGE / "models.py").read_text()
    assert "trust_remote_code: bool = False" in models
