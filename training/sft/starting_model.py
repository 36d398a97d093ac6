"""The model an SFT run starts from: a local pretrained LM or a preset built from its config, its SID token
embeddings set from the item texts (``--text-init``), and the configuration's dropout added.

A resumed run rebuilds only the dropout (``with_dropout``) on the model it loads; a fresh run builds all of it
(``fresh_policy``) right after seeding, so the same seed draws the same weights.
"""

from __future__ import annotations

import numpy as np

from models.policy import Policy
from training.data.dataset import RecDataset
from training.sft.config import SFTConfig
from training.sft.regularisers import add_embedding_dropout, add_residual_dropout, init_sid_embeddings


def text_embeddings(data: RecDataset) -> np.ndarray:
    """The item embeddings ``--text-init`` starts the SID tokens from; a ``ValueError`` naming the command
    that makes them when the data set has none."""
    if data.embeddings is None:
        raise ValueError(
            "--text-init needs item_emb.npy in the data set: make it with vstar embed --data DIR "
            "--encoder PATH (a local text encoder), or pass --no-text-init"
        )
    return data.embeddings


def fresh_policy(data: RecDataset, config: SFTConfig, device: str) -> Policy:
    """A new run's model: built (``new_policy``), its SID embeddings from the item texts (``text_init``), and
    its dropout."""
    policy = new_policy(data, config, device)
    if config.text_init:
        init_sid_embeddings(policy, text_embeddings(data))
    return with_dropout(policy, config)


def with_dropout(policy: Policy, config: SFTConfig) -> Policy:
    """``policy`` with the configuration's embedding and residual dropout added (none where 0)."""
    if config.embed_dropout > 0:
        add_embedding_dropout(policy, config.embed_dropout)
    if config.hidden_dropout > 0:
        add_residual_dropout(policy, config.hidden_dropout)
    return policy


def new_policy(data: RecDataset, config: SFTConfig, device: str) -> Policy:
    """The model SFT starts from: a local pretrained LM (``base_model``) or a preset built from its config."""
    if config.base_model:
        return Policy.from_pretrained_lm(config.base_model, data.catalog, config.max_history, config.item_tokens).to(
            device
        )
    return Policy.from_preset(config.preset, data.catalog, config.seed, config.max_history, config.item_tokens).to(
        device
    )
