"""Remote code in a checkpoint: importing it leaves a file in the working directory, which the
corpus test would see. It must never run unless a recipe says trust_remote_code: true."""
from pathlib import Path

Path("remote-code-ran").write_text("remote code was executed\n")

from transformers import PretrainedConfig  # noqa: E402


class EvilConfig(PretrainedConfig):
    model_type = "evil-model"
