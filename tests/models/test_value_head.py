"""Value head: config checks, shapes, masking, the cached path equals forward, gradients."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from models.policy import Policy
from models.value_head import ValueHead, ValueHeadConfig, value_head_for

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
