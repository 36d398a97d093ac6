"""``CheckpointError``: a checkpoint folder is missing, incomplete, corrupt or inconsistent.

Its own module, free of torch, so that the console command can turn it into
one line on any command without importing the model stack first. The message
always names the folder and, where one file is at fault, that file; it is kept
to one line (wrapped library errors often span several).
"""

from __future__ import annotations


class CheckpointError(ValueError):
    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))
