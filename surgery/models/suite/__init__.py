"""The SmolLM2 task suite: full fine-tunes of ``builtin:smollm2-135m`` on four local tasks.

    >>> from surgery.models.suite import build, tasks
    >>> tasks.make_examples("add", 4, seed=0, split="validation")

Built-in names ``builtin:smollm2-135m/<task>`` (seed 0) and ``builtin:smollm2-135m/<task>@s<N>``
(N in 1..4); ``surgery suite build --seeds 0,1,2`` builds them ahead of use. Tasks and splits:
:mod:`surgery.models.suite.tasks`; training and scoring: :mod:`surgery.models.suite.train`; cache:
:mod:`surgery.models.suite.build`.
"""
