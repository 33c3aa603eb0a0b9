"""The malformed-input corpus (cases.yaml) through the CLI.

Every case must exit 2 with exactly one line on stderr (``error: <recipe file>: ...`` naming the
step and key), show no traceback, and leave nothing behind: the working directory stays empty and
the corpus gains no file. Recipe-only cases run with model loading made to fail loudly.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import surgery.models.loading
import surgery.runtime.runner

CORPUS = Path(__file__).parent
CASES = yaml.safe_load((CORPUS / "cases.yaml").read_text(encoding="utf-8"))
CORPUS_DIRS = ("recipes", "data", "models", "sae", "plugins")
BASE_RECIPES = ("merge.yaml", "probe-loss.yaml", "capture-mean.yaml", "tune.yaml", "fam-cluster.yaml")
SIZE = {"hidden": 32, "layers": 2, "heads": 4, "kv_heads": 2}



# --- the corpus, with its built files ------------------------------------------------------------

@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A copy of the corpus with the models of ``models/*/build.json`` and the SAE weights of
    ``sae/*/weights.json`` built into it."""
    root = tmp_path_factory.mktemp("bad_inputs")
    shutil.copytree(CORPUS, root, dirs_exist_ok=True, ignore=shutil.ignore_patterns("test_*.py", "__pycache__"))
    specs = {path.parent: json.loads(path.read_text()) for path in (root / "models").glob("*/build.json")}
    for directory, spec in sorted(specs.items(), key=lambda item: "copy" in item[1]):  # originals first
        build_model(directory, spec)
    for weights in (root / "sae").glob("*/weights.json"):
        build_sae_weights(weights.parent, json.loads(weights.read_text()))
    (root / "plugins" / "__pycache__").mkdir(exist_ok=True)  # an import attempt must not add files
    return root


def build_model(directory: Path, spec: dict) -> None:
    from surgery.models.zoo.tokenizer import build_tokenizer

    if "copy" in spec:
        shutil.copytree(directory.parent / spec["copy"], directory, dirs_exist_ok=True, ignore=shutil.ignore_patterns("build.json"))
        damage(directory, spec)
        return
    torch.manual_seed(spec["seed"])
    if spec["arch"] == "opt":  # a transformers architecture without a surgery adapter
        from transformers import OPTConfig, OPTForCausalLM

        tokenizer = build_tokenizer()
        model = OPTForCausalLM(OPTConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, ffn_dim=64,
                                         num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32))
    else:
        from surgery.models.zoo.architectures import build_model as build_zoo_model

        model = build_zoo_model(spec["arch"], {**SIZE, **spec.get("size", {})})
    model.save_pretrained(directory)
    build_tokenizer().save_pretrained(directory)


def damage(directory: Path, spec: dict) -> None:
    from safetensors.torch import load_file, save_file

    weights = directory / "model.safetensors"
    if spec["damage"] == "truncate":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif spec["damage"] in ("nan", "inf", "drop"):
        tensors = load_file(str(weights))
        if spec["damage"] == "drop":
            del tensors[spec["tensor"]]
        else:
            tensors[spec["tensor"]][0, 0] = float(spec["damage"])
        save_file(tensors, str(weights), metadata={"format": "pt"})
    elif spec["damage"] == "no-tokenizer":
        for path in directory.glob("*token*"):
            path.unlink()
    elif spec["damage"] == "config":
        config = json.loads((directory / "config.json").read_text())
        (directory / "config.json").write_text(json.dumps({**config, **spec["config"]}))
    else:
        raise ValueError(f"unknown damage {spec['damage']!r}")


def build_sae_weights(directory: Path, shapes: dict) -> None:
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(shape, generator=generator) * 0.1 for name, shape in shapes.items() if name != "truncate"}
    path = directory / "sae_weights.safetensors"
    save_file(tensors, str(path))
    if shapes.get("truncate"):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])


def listing(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*")}


def resolve(arg: str, root: Path) -> str:
    """Corpus paths (``recipes/x.yaml``) become absolute; everything else is passed as written."""
    return str(root / arg) if "/" in arg and arg.split("/", 1)[0] in CORPUS_DIRS else arg


@pytest.fixture
def forbid_loading(monkeypatch):
    """Make any attempt to load or build a model fail loudly."""

    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded for a case that needs only the recipe")

    for module in (surgery.models.loading, surgery.runtime.runner):
        monkeypatch.setattr(module, "load_model", boom)
        monkeypatch.setattr(module, "resolve_path", boom)


# --- the cases -----------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=[case["id"] for case in CASES])
def test_bad_input(case, corpus, tmp_path, monkeypatch, request, surgery_cli):
    if case["kind"] == "recipe":
        request.getfixturevalue("forbid_loading")
    for name, value in case.get("env", {}).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SURGERY_ALLOW_DOWNLOAD", "0")  # restored after the case, whatever the CLI sets
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    args = [resolve(arg, corpus) for arg in case["args"]]
    before = listing(corpus)

    result = surgery_cli(*args)

    assert result.exit_code == 2, result
    assert "Traceback" not in result.err + result.out
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    line = lines[0]
    assert line.startswith("error: "), line
    if case["kind"] == "usage":  # click's usage errors name the command, not a recipe
        assert line.startswith(f"error: surgery"), line
    elif args[0] in ("run", "validate") and case["kind"] != "cli":
        assert line.startswith(f"error: {args[1]}: "), line
    for fragment in case["expect"]:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    left = sorted(path.name for path in work.iterdir())
    assert left == sorted(case.get("leaves", [])), "the failed command left files in the working directory"
    assert listing(corpus) == before, "the failed command wrote into the corpus"


def test_corpus_is_complete():
    """At least 50 distinct cases, and every corpus file is used by a case."""
    ids = [case["id"] for case in CASES]
    assert len(ids) >= 50 and len(set(ids)) == len(ids)
    assert {case["kind"] for case in CASES} == {"recipe", "data", "model", "sae", "run", "cli", "usage"}
    named = " ".join(" ".join(case["args"]) for case in CASES)
    unused = [f"recipes/{p.name}" for p in (CORPUS / "recipes").iterdir() if p.name not in named]
    named += " ".join(p.read_text(encoding="utf-8", errors="replace") for p in (CORPUS / "recipes").iterdir())
    for folder in ("data", "models", "sae", "plugins"):
        unused += [f"{folder}/{p.name}" for p in (CORPUS / folder).iterdir()
                   if p.name != "__pycache__" and f"{folder}/{p.stem if folder == 'plugins' else p.name}" not in named]
    assert unused == []


@pytest.mark.parametrize("recipe", BASE_RECIPES)
def test_base_recipes_run(recipe, corpus, tmp_path, monkeypatch, surgery_cli):
    """The recipes the cases break are themselves fine: the cases fail for the reason they name."""
    monkeypatch.chdir(tmp_path)
    result = surgery_cli("run", corpus / "recipes" / recipe)
    assert result.exit_code == 0, result.err
    assert (tmp_path / "run" / "report.json").is_file()
