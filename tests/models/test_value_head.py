"""Value head: config checks, shapes, masking, the cached path equals forward, gradients."""

from __future__ import annotations

import copy
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from models.policy import Policy
from models.value_head import ValueHead, ValueHeadConfig, load_value_head, value_head_for, value_head_manifest

H = 16


def head(seed: int = 0) -> ValueHead:
    torch.manual_seed(seed)
    return ValueHead(ValueHeadConfig(H, num_heads=4)).eval()


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 6, H, generator=g)  # (N, T, H)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]])
    return hidden, mask


def test_config_resolves_defaults_and_rejects_bad_values() -> None:
    config = ValueHeadConfig(32)
    assert (config.ffn_size, config.mlp_hidden, config.head_dim) == (128, 32, 8)
    assert ValueHeadConfig(**asdict(config)) == config
    with pytest.raises(ValueError, match="num_heads"):
        ValueHeadConfig(30, num_heads=4)
    with pytest.raises(ValueError, match="dropout"):
        ValueHeadConfig(32, dropout=1.0)
    with pytest.raises(ValueError, match="hidden_size"):
        ValueHeadConfig(0)


def test_shapes_and_padding_is_zero() -> None:
    hidden, mask = batch()
    values = head()(hidden, mask)
    assert values.shape == (3, 6)
    assert torch.all(values[mask == 0] == 0) and torch.isfinite(values).all()


def test_padding_content_and_amount_do_not_matter() -> None:
    hidden, mask = batch()
    net = head()
    ref = net(hidden, mask)
    noisy = hidden.clone()
    noisy[mask == 0] = 100.0
    torch.testing.assert_close(net(noisy, mask), ref)
    # row 1 without its two pads equals row 1 with them
    alone = net(hidden[1:2, 2:], mask[1:2, 2:])
    torch.testing.assert_close(alone[0], ref[1, 2:], rtol=1e-5, atol=1e-6)


def test_causal_future_does_not_change_the_past() -> None:
    hidden, mask = batch()
    net = head()
    ref = net(hidden, mask)
    changed = hidden.clone()
    changed[:, 4:] = torch.randn(3, 2, H)
    out = net(changed, mask)
    torch.testing.assert_close(out[:, :4], ref[:, :4])
    assert not torch.allclose(out[0, 4:], ref[0, 4:])


def test_step_with_cached_keys_equals_forward_at_every_position() -> None:
    hidden, mask = batch()
    net = head()
    ref = net(hidden, mask)  # (N, T)
    keys, values = net.kv(hidden)  # (N, heads, T, d)
    for t in range(hidden.shape[1]):
        got = net.step(hidden[:, t], keys[:, :, : t + 1], values[:, :, : t + 1], mask[:, : t + 1])
        valid = mask[:, t] == 1
        torch.testing.assert_close(got[valid], ref[valid, t], rtol=1e-5, atol=1e-6)
        # VED computes a new node's query with its key and value (``qkv_heads``) and passes it: the same value
        query, own_k, own_v = net.qkv_heads(hidden[:, t : t + 1])
        assert all(torch.equal(a, b) for a, b in zip((own_k, own_v), net.kv(hidden[:, t : t + 1]), strict=True))
        given = net.step(hidden[:, t], keys[:, :, : t + 1], values[:, :, : t + 1], mask[:, : t + 1], query)
        assert torch.equal(given, got)


def test_gradients_reach_every_parameter_and_not_a_detached_input() -> None:
    hidden, mask = batch()
    net = head().train()
    loss = (net(hidden.detach(), mask) - 1.0).pow(2).sum()
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    leaf = hidden.clone().requires_grad_(True)
    net(leaf, mask).sum().backward()
    assert leaf.grad is not None and leaf.grad[mask == 1].abs().sum() > 0


def test_value_head_for_policy_round_trips_through_its_state(tiny_policy: Policy) -> None:
    net = value_head_for(tiny_policy)
    assert net.config.hidden_size == tiny_policy.model.config.hidden_size
    clone = ValueHead(ValueHeadConfig(**asdict(net.config)))
    clone.load_state_dict(net.state_dict())
    hidden, mask = torch.randn(2, 5, net.config.hidden_size), torch.ones(2, 5, dtype=torch.long)
    torch.testing.assert_close(clone.eval()(hidden, mask), net.eval()(hidden, mask))


def test_a_checkpoints_value_head_loads_back_as_it_was_saved(tiny_policy: Policy, tmp_path: Path) -> None:
    """What RL writes (the state dict in ``value_head.safetensors``, ``value_head_manifest`` in the manifest)
    ``load_value_head`` rebuilds: the same config, weights and values, in eval mode; a head kept in bfloat16
    loads as the float32 head its weights round to (``ValueHead`` is built in float32; VED casts the backbone's
    states to the head's dtype). An SFT checkpoint has none: None when not required, else a CheckpointError."""
    torch.manual_seed(3)
    net = value_head_for(tiny_policy, num_heads=2, ffn_size=48, mlp_hidden=8, dropout=0.1)
    hidden, mask = torch.randn(2, 5, net.config.hidden_size), torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    for dtype in (torch.float32, torch.bfloat16):
        saved = copy.deepcopy(net).to(dtype)
        path = save_checkpoint(
            tmp_path / str(dtype),
            tiny_policy,
            {"value_head": value_head_manifest(saved)},
            {"value_head": saved.state_dict()},
        )
        loaded = load_value_head(load_checkpoint(path))
        assert loaded.config == net.config and not loaded.training
        for (name, p), q in zip(loaded.named_parameters(), saved.parameters(), strict=True):
            assert p.dtype == torch.float32 and torch.equal(p, q.float()), name
        torch.testing.assert_close(loaded(hidden, mask), saved.float().eval()(hidden, mask), rtol=0, atol=0)
    sft = load_checkpoint(save_checkpoint(tmp_path / "sft", tiny_policy, {"stage": "sft"}))
    assert load_value_head(sft, required=False) is None
    with pytest.raises(CheckpointError, match="has no value head"):
        load_value_head(sft)
