"""SFT's regularisers for the small-data regime, none of which changes the checkpoint's format.

* dropout on the input embeddings and residual dropout on every layer's
  attention and MLP outputs (Qwen2 has attention dropout only), each a forward
  hook, so the saved weights are the plain model's;
* SID token embeddings initialised from the items' text embeddings (PCA of
  each token's item mean) instead of random;
* an exponential moving average of the weights, swapped in for validation and
  saving while the optimizer steps the raw weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from models.policy import Policy
from models.sid_tokenizer import item_token


def dropout_hook(p: float) -> Callable[[torch.nn.Module, object, Any], Any]:
    """A forward hook applying dropout to a module's output (the first element of a tuple output)
    while the module trains; hooks leave the checkpoint unchanged."""

    def hook(module: torch.nn.Module, inputs: object, output: Any) -> Any:
        if isinstance(output, tuple):
            return (torch.nn.functional.dropout(output[0], p, module.training), *output[1:])
        return torch.nn.functional.dropout(output, p, module.training)

    return hook


def add_embedding_dropout(policy: Policy, p: float) -> None:
    """Dropout on the token embeddings while training."""
    policy.model.get_input_embeddings().register_forward_hook(dropout_hook(p))


def add_residual_dropout(policy: Policy, p: float) -> None:
    """Dropout on each decoder layer's attention and MLP outputs before they join the residual stream
    (GPT-2 / BERT's residual dropout; Qwen2 has none)."""
    layers = getattr(getattr(policy.model, "model", None), "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") and hasattr(layer, "mlp") for layer in layers):
        raise ValueError(f"--hidden-dropout: {type(policy.model).__name__} has no model.layers[i].self_attn / .mlp")
    hook = dropout_hook(p)
    for layer in layers:
        layer.self_attn.register_forward_hook(hook)
        layer.mlp.register_forward_hook(hook)


@torch.no_grad()
def init_sid_embeddings(policy: Policy, item_emb: np.ndarray) -> None:
    """Set each SID token's input embedding to the mean text embedding of its items, projected by PCA.

    Whole-SID item tokens, when the prompt has them, get the mean of their own
    items the same way. The projection keeps the top principal directions of those token means and
    rescales them to the embedding matrix's current std, so training starts with
    semantically close tokens close together instead of random.
    """
    cat, emb = policy.catalog, policy.model.get_input_embeddings().weight
    assert isinstance(emb, torch.Tensor)
    token_ids, means = [], []
    for level in range(cat.depth):
        for token in cat.tokens_of_level(level):
            items = [i for i, it in cat.items.items() if it.sid[level] == token]
            token_ids.append(policy.tokenizer.convert_tokens_to_ids(token))
            means.append(item_emb[items].mean(axis=0))
    if policy.prompt.item_tokens:
        for sid, items in zip(cat.sids, cat.items_of_sid, strict=True):
            token_ids.append(policy.tokenizer.convert_tokens_to_ids(item_token(sid)))
            means.append(item_emb[items].mean(axis=0))
    x = torch.tensor(np.stack(means), dtype=torch.float32)
    x = x - x.mean(dim=0, keepdim=True)
    u, sv, _ = torch.linalg.svd(x, full_matrices=False)
    dim = min(emb.shape[1], u.shape[1])
    proj = torch.zeros(len(token_ids), emb.shape[1])
    proj[:, :dim] = u[:, :dim] * sv[:dim]
    spread = proj.std()
    if not float(spread) > 1e-12:  # every SID's mean embedding alike (or one SID): there is nothing to start from
        raise ValueError(
            "--text-init: the item embeddings (item_emb.npy) are the same for every SID, so they cannot tell the "
            "SID tokens apart: train with --no-text-init, or embed the items again (vstar embed)"
        )
    # the embedding may live on a GPU: a plain float crosses devices. The ratio stays a float32 tensor, as the
    # recipe's runs computed it: in float64 the weights differ in their last bits, enough to change what a run
    # chooses (docs/rl-experiments.md, "VED's ranking after RL")
    proj *= emb.std().item() / spread
    emb[torch.tensor(token_ids, device=emb.device)] = proj.to(emb.device, emb.dtype)


class WeightAverage:
    """An exponential moving average of a model's weights (``torch.optim.swa_utils``), swapped in on demand.

    ``swapped_in()`` puts the averaged weights into the live model and restores the
    training weights on exit, so selection, decoding and checkpoints see the average
    while the optimizer keeps stepping the raw weights.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.model = model
        self.average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)

    def update(self) -> None:
        self.average.update_parameters(self.model)

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        live = self.model.state_dict()
        saved = {k: v.detach().clone() for k, v in live.items()}
        with torch.no_grad():
            for k, v in self.average.module.state_dict().items():
                live[k].copy_(v)
        try:
            yield
        finally:
            with torch.no_grad():
                for k, v in saved.items():
                    live[k].copy_(v)

    def state_dict(self) -> dict[str, Any]:
        return self.average.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.average.load_state_dict(state)
