"""API keys guard the write endpoint when set; reads stay open; keys never reach a log line."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from service.app import create_app
from service.settings import Settings
from vstar import app


def test_writes_need_one_of_the_keys_when_keys_are_set(
    make_settings: Callable[..., Settings], capfd: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings(api_keys=["key-one-0123456789", "key-two-0123456789"], log_level="INFO")
    with TestClient(create_app(settings)) as c:
        for headers in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": ""}):
            r = c.post("/users/ann/events", json={"items": [1]}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized", r.text
            assert r.json()["error"]["message"].startswith("X-API-Key:")
        assert c.get("/users/ann/history").status_code == 404  # nothing was stored
        for key in ("key-one-0123456789", "key-two-0123456789"):
            assert c.post("/users/ann/events", json={"items": [1]}, headers={"X-API-Key": key}).status_code == 200
        assert c.post("/recommend", json={"user_id": "ann", "k": 2}).status_code == 200  # reads stay open
        for headers in ({}, {"X-API-Key": "wrong"}):  # a delete is a write
            assert c.delete("/users/ann/history", headers=headers).status_code == 401
        assert c.get("/users/ann/history").status_code == 200
        r = c.delete("/users/ann/history", headers={"X-API-Key": "key-two-0123456789"})
        assert r.status_code == 200 and r.json()["deleted"] == 2
        assert "X-API-Key" in str(c.get("/openapi.json").json()["components"]["securitySchemes"])
    logged = capfd.readouterr().err
    assert '"msg": "settings"' in logged and "0123456789" not in logged


def test_without_keys_writes_are_open(make_settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(make_settings())) as c:
        assert c.post("/users/bo/events", json={"items": [1]}).status_code == 200
        assert "securitySchemes" not in c.get("/openapi.json").json()["components"]  # the schema says so too


def test_keys_come_from_a_comma_list_in_the_environment(monkeypatch: pytest.MonkeyPatch, tiny_checkpoint: Path) -> None:
    monkeypatch.setenv("VSTAR_API_KEYS", "alpha-key-1, beta-key-2")
    keys = Settings(checkpoint=tiny_checkpoint).api_keys
    assert [k.get_secret_value() for k in keys] == ["alpha-key-1", "beta-key-2"]
    monkeypatch.setenv("VSTAR_API_KEYS", '["alpha-key-1", "beta-key-2"]')  # read as keys '["alpha-key-1"' and ...
    with pytest.raises(ValueError, match=r"api_keys\n.*a comma list of keys \(key1,key2\), not a JSON list"):
        Settings(checkpoint=tiny_checkpoint)
    monkeypatch.delenv("VSTAR_API_KEYS")
    # named by the variables an operator sets (it said "require_api_keys ... api_keys", the fields' names)
    with pytest.raises(ValueError, match="VSTAR_REQUIRE_API_KEYS is set but VSTAR_API_KEYS names no key"):
        Settings(checkpoint=tiny_checkpoint, api_keys=[], require_api_keys=True)


def test_serve_warns_when_writes_are_open_beyond_loopback(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import service.cli

    monkeypatch.setattr(service.cli, "_run", lambda config: None)  # the checks before the server starts, only
    monkeypatch.delenv("VSTAR_API_KEYS", raising=False)
    public = CliRunner().invoke(app, ["serve", "--checkpoint", str(tiny_checkpoint), "--host", "0.0.0.0"])
    assert public.exit_code == 0 and "VSTAR_API_KEYS" in public.output
    local = CliRunner().invoke(app, ["serve", "--checkpoint", str(tiny_checkpoint)])
    assert local.exit_code == 0 and "VSTAR_API_KEYS" not in local.output
