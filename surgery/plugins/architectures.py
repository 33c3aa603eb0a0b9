"""The built-in architecture adapters, registered by ``model_type`` (views in :mod:`surgery.models.architectures`)."""
from __future__ import annotations

from typing import Callable

from surgery import hookimpl
from surgery.models.architectures import LLAMA_LIKE, bert_view, gpt2_view, llama_view, llava_view, modernbert_view


@hookimpl
def register_architectures(register: Callable[..., None]) -> None:
    for model_type in LLAMA_LIKE:
        register(model_type, llama_view)
    register("gpt2", gpt2_view)
    register("bert", bert_view)
    register("roberta", bert_view)
    register("modernbert", modernbert_view)
    register("llava", llava_view)
