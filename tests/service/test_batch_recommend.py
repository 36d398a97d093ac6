"""``vstar recommend``: a file of users answered offline as ``POST /recommend`` answers each of them.

The checkpoint has what a trained one serves with: external ids (``item_map.json``), transition counts with a
fusion weight, a value head and the VED settings its RL run trained with. The service it is compared with runs
in process (``TestClient``, lifespan included), one request at a time, cache off.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from models.checkpoint import save_checkpoint
from models.policy import Policy
from models.sid_catalog import SidCatalog, sid_to_str
from models.transition import STATE_NAME, TransitionCounts
from models.value_head import value_head_for, value_head_manifest
from service.app import create_app
from service.batch_recommend import InputError, StoreError, recommend_file
from service.settings import Settings
from service.stores import MemoryStore, StoreRefused
from training.data.dataset import RecDataset
from vstar import app

K = 5
TRAINED_VED = {"init_beams": 8, "lam": 0.2, "beta": 0.5, "value_weight": 0.5, "explore_slots": 2}


def sku(item_id: int) -> str:
    return f"SKU/{item_id:03d}"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_policy: Policy, tiny_dataset: RecDataset) -> Path:
    catalog = tiny_policy.catalog.with_external_ids({i: sku(i) for i in tiny_policy.catalog.items})
    named = Policy(tiny_policy.model, tiny_policy.tokenizer, catalog, tiny_policy.prompt)
    counts = TransitionCounts.fit((s.history, s.target) for s in tiny_dataset.samples(["train", "valid"]))
    torch.manual_seed(1)
    head = value_head_for(named)
    manifest = {
        "fusion": {"weight": 2.0},
        "value_head": value_head_manifest(head),
        "rl_config": {"ved_config": TRAINED_VED},
    }
    extras = {STATE_NAME: counts.to_state(), "value_head": head.state_dict()}
    return save_checkpoint(tmp_path_factory.mktemp("batch") / "ckpt", named, manifest, extras)


@pytest.fixture(scope="module")
def histories(tiny_dataset: RecDataset, tiny_catalog: SidCatalog) -> list[list[Any]]:
    """Test rows' histories, some longer than the prompt window, with items named in every form the API takes."""
    rows = [list(s.history) for s in tiny_dataset.splits["test"][:12]]
    rows.append(rows[0] + rows[1] + rows[2])  # past the prompt window: its oldest items are cut
    rows.append([str(rows[3][0]), sid_to_str(tiny_catalog.sid_of(rows[3][1])), {"external_id": sku(rows[3][2])}])
    rows.append([rows[4][0]] * 3)  # one item, three times
    return rows


@pytest.fixture(scope="module")
def client(make_settings: Callable[..., Settings], checkpoint: Path) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(checkpoint=checkpoint, cache_ttl_s=0, batch_max_size=1))) as c:
        yield c


def write_users(path: Path, histories: list[list[Any]]) -> Path:
    path.write_text("".join(json.dumps({"user_id": f"u {i}", "history": h}) + "\n" for i, h in enumerate(histories)))
    return path


def recommend(checkpoint: Path, source: Path, out: Path, *options: str) -> list[dict[str, Any]]:
    args = ["recommend", "--checkpoint", str(checkpoint), "--input", str(source), "--out", str(out), *options]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"users -> {out}" in result.output
    return [json.loads(line) for line in out.read_text().splitlines()]


def one_line_error(args: list[str], env: dict[str, str | None] | None = None) -> str:
    result = CliRunner().invoke(app, args, env=env)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


@pytest.mark.parametrize(("mode", "exclude"), [("beam", False), ("beam", True), ("ved", False), ("ved", True)])
def test_each_user_gets_what_post_recommend_answers(
    client: TestClient, checkpoint: Path, histories: list[list[Any]], tmp_path: Path, mode: str, exclude: bool
) -> None:
    flag = "--exclude-history" if exclude else "--no-exclude-history"
    options = ["--k", str(K), "--mode", mode, flag, "--batch-size", "1"]
    got = recommend(checkpoint, write_users(tmp_path / "in.jsonl", histories), tmp_path / "out.jsonl", *options)
    assert [line["user_id"] for line in got] == [f"u {i}" for i in range(len(histories))]
    for history, line in zip(histories, got, strict=True):
        body: dict[str, Any] = {"history": history, "k": K, "mode": mode, "exclude_history": exclude}
        if mode == "ved":
            body["latency_ms"] = 1000
        answer = client.post("/recommend", json=body).json()
        if mode == "ved":
            assert answer["cap_hit"] is False and answer["search"]["fallback"] is None, answer["search"]
        assert line["items"] == answer["items"] and len(line["items"]) == K, history


@pytest.mark.parametrize("mode", ["beam", "ved"])
def test_a_lines_exclude_items_are_the_requests(
    client: TestClient,
    checkpoint: Path,
    histories: list[list[Any]],
    tiny_catalog: SidCatalog,
    tmp_path: Path,
    mode: str,
) -> None:
    """Each line's own exclusions, in every form the request takes (an unknown id passed over), answered as
    POST /recommend answers the same exclude_items."""
    users = []
    for i, history in enumerate(histories[:6]):
        blocked = [history[-1] + 1, sid_to_str(tiny_catalog.sid_of(history[0])), {"external_id": sku(i)}, 99999]
        users.append({"user_id": f"u {i}", "history": history} | ({"exclude_items": blocked} if i % 3 else {}))
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(user) + "\n" for user in users))
    got = recommend(checkpoint, source, tmp_path / "out.jsonl", "--k", str(K), "--mode", mode, "--batch-size", "1")
    for user, line in zip(users, got, strict=True):
        body = {k: v for k, v in user.items() if k != "user_id"} | {"k": K, "mode": mode}
        answer = client.post("/recommend", json=body | ({"latency_ms": 1000} if mode == "ved" else {})).json()
        assert line["items"] == answer["items"] and len(line["items"]) == K, user
        if "exclude_items" in user:
            blocked_sid = user["exclude_items"][1]
            assert blocked_sid not in {it["sid"] for it in line["items"]}
            assert not {i for it in line["items"] for i in it["item_ids"]} & {user["history"][-1] + 1}


@pytest.mark.parametrize("mode", ["beam", "ved"])
def test_the_batch_size_changes_no_answer(
    checkpoint: Path, histories: list[list[Any]], tmp_path: Path, mode: str
) -> None:
    """Batches of 7 mix users of several decode configs (exclusion adds beams per user), and end part-filled."""
    source = write_users(tmp_path / "in.jsonl", histories)
    options = ["--mode", mode, "--exclude-history"]
    alone = recommend(checkpoint, source, tmp_path / "alone.jsonl", *options, "--batch-size", "1")
    batched = recommend(checkpoint, source, tmp_path / "batched.jsonl", *options, "--batch-size", "7")
    for a, b in zip(alone, batched, strict=True):
        assert [{**it, "score": None} for it in a["items"]] == [{**it, "score": None} for it in b["items"]]
        want = torch.tensor([it["score"] for it in a["items"]])
        torch.testing.assert_close(torch.tensor([it["score"] for it in b["items"]]), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"history": [1, 2', "in.jsonl:2: not valid JSON at column 18: Expecting ',' delimiter"),
        ('{"history": [1, 99999]}', "in.jsonl:2: history: unknown item ids [99999] (1)"),
        ('{"history": ["<a_1>"]}', "in.jsonl:2: history: malformed SIDs ['<a_1>'] (1): expected 3 tokens"),
        ('{"user_id": "x"}', "in.jsonl:2: history: missing"),
        ('{"history": [1], "k": 3}', "in.jsonl:2: unknown fields ['k']"),
        ('{"history": [1], "exclude_items": ["<a_1>"]}', "in.jsonl:2: exclude_items: malformed SIDs ['<a_1>'] (1)"),
        ('{"history": [1], "exclude_items": 4}', "in.jsonl:2: exclude_items: "),
        ('{"history": [1.5]}', 'in.jsonl:2: history.0: expected an item id, a SID string or an {"external_id"'),
        ('{"user_id": 7, "history": [1]}', "in.jsonl:2: user_id: expected a string, got 7"),
        # a lone surrogate: read as a str, but no UTF-8 answer line can hold it (it failed after every decode)
        ('{"user_id": "u\\ud800", "history": [1]}', "in.jsonl:2: user_id: 'u\\ud800' is not valid Unicode"),
    ],
)
def test_a_bad_line_is_one_error_naming_it_and_nothing_is_written(
    checkpoint: Path, tmp_path: Path, line: str, message: str
) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text(f'{{"history": [1, 2]}}\n{line}\n\n{{"history": [3]}}\n')
    out = tmp_path / "out.jsonl"
    args = ["recommend", "--checkpoint", str(checkpoint), "--input", str(source), "--out", str(out)]
    assert message in one_line_error(args)
    assert [p.name for p in tmp_path.iterdir()] == ["in.jsonl"]


def test_every_bad_line_is_counted(checkpoint: Path, tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text('{"history": [1]}\n{"history": [99999]}\n{"history": [1]}\n{"history": ["5", 88888]}\n')
    args = ["recommend", "--checkpoint", str(checkpoint), "--input", str(source), "--out", str(tmp_path / "o")]
    error = one_line_error(args)
    assert "in.jsonl:2: history: unknown item ids [99999] (1) (2 lines have errors; the first is shown)" in error


def test_an_existing_out_is_kept_unless_forced_and_then_only_by_good_input(
    checkpoint: Path, histories: list[list[Any]], tmp_path: Path
) -> None:
    source = write_users(tmp_path / "in.jsonl", histories[:3])
    out = tmp_path / "out.jsonl"
    out.write_text("earlier answers\n")
    args = ["recommend", "--checkpoint", str(checkpoint), "--input", str(source), "--out", str(out)]
    assert "exists: give --force to replace it" in one_line_error(args)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"history": [99999]}\n')
    assert "bad.jsonl:1: history: unknown item ids" in one_line_error([*args[:4], str(bad), *args[5:], "--force"])
    assert out.read_text() == "earlier answers\n"
    assert len(recommend(checkpoint, source, out, "--force")) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "in.jsonl", "out.jsonl"]  # no temporary left
    assert "is the --input file" in one_line_error([*args[:6], str(source), "--force"])


def test_options_the_request_refuses_are_refused_before_any_line_is_read(checkpoint: Path, tmp_path: Path) -> None:
    source = write_users(tmp_path / "in.jsonl", [[1, 2]])
    args = ["recommend", "--checkpoint", str(checkpoint), "--input", str(source), "--out", str(tmp_path / "o")]
    assert "--budget" in one_line_error([*args, "--budget", "40"]) and "--mode ved only" in one_line_error(
        [*args, "--budget", "40"]
    )
    # VED's initial tree alone needs (3 - 1) x max(init_beams 8, k 10) = 20 tokens
    assert "--budget: budget 19 is below" in one_line_error([*args, "--mode", "ved", "--budget", "19", "--k", "10"])
    assert not (tmp_path / "o").exists()


def test_external_ids_in_and_out(checkpoint: Path, histories: list[list[Any]], tmp_path: Path) -> None:
    ids = [h for h in histories if all(isinstance(e, int) for e in h)][:4]
    by_id = recommend(checkpoint, write_users(tmp_path / "ids.jsonl", ids), tmp_path / "a.jsonl")
    named = [[{"external_id": sku(i)} for i in h] for h in ids]
    by_external = recommend(checkpoint, write_users(tmp_path / "named.jsonl", named), tmp_path / "b.jsonl")
    assert by_external == by_id
    for line in by_id:
        for it in line["items"]:
            assert it["external_ids"] == [sku(i) for i in it["item_ids"]] and it["item_ids"]
    source = tmp_path / "unknown.jsonl"
    source.write_text(json.dumps({"history": [{"external_id": "SKU/999"}]}) + "\n")
    args = ["recommend", "--checkpoint", str(checkpoint), "--input", str(source), "--out", str(tmp_path / "c")]
    assert "unknown.jsonl:1: history: unknown external ids ['SKU/999'] (1)" in one_line_error(args)


def test_a_checkpoint_without_external_ids_answers_null_and_refuses_them(tiny_checkpoint: Path, tmp_path: Path) -> None:
    got = recommend(tiny_checkpoint, write_users(tmp_path / "in.jsonl", [[1, 2, 3]]), tmp_path / "out.jsonl")
    assert got[0]["user_id"] == "u 0" and all(it["external_ids"] is None for it in got[0]["items"])
    source = write_users(tmp_path / "named.jsonl", [[{"external_id": "SKU/001"}]])
    args = ["recommend", "--checkpoint", str(tiny_checkpoint), "--input", str(source), "--out", str(tmp_path / "o")]
    assert "this checkpoint's catalog has none" in one_line_error(args)


@pytest.mark.parametrize("mode", ["beam", "ved"])
def test_a_missing_value_head_is_warned_about_only_when_ved_will_use_it(
    tiny_checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: str
) -> None:
    """An SFT checkpoint has no value head: VED runs with a fresh one, and says so; beam search never reads it."""
    with caplog.at_level(logging.WARNING, logger="service.app"):
        recommend(
            tiny_checkpoint, write_users(tmp_path / "in.jsonl", [[1, 2, 3]]), tmp_path / "out.jsonl", "--mode", mode
        )
    warned = [r for r in caplog.records if "no value head" in r.getMessage()]
    assert len(warned) == (mode == "ved"), warned


# ---- --stored-history: each named user's stored history before the line's own, as POST /recommend combines them

STALE = "99999"  # an entry stored under an older catalog: skipped, and counted, by both


def store_events(client: TestClient, histories: list[list[Any]]) -> dict[str, list[Any]]:
    """Users with stored events, written through the app (and one stale entry, through its store): id -> events.
    Once per app (the writes' Idempotency-Keys): the module's client serves several tests."""
    stored = {f"stored-{i}": h for i, h in enumerate(histories[:6])}
    for user_id, events in stored.items():
        written = client.post(f"/users/{user_id}/events", json={"items": events}, headers={"Idempotency-Key": "batch"})
        assert written.status_code == 200
    store = client.app.state.recommender.store  # type: ignore[attr-defined]
    assert client.portal is not None
    client.portal.call(store.append, "stored-0", [STALE], "stale")  # on the app's loop, as Redis's pool needs
    return stored


def stored_users(histories: list[list[Any]]) -> list[dict[str, Any]]:
    """Lines of users with a stored history and none of their own (left out, or empty), or some of their own;
    and a user with no stored history beside a line's own, and a line with no user_id."""
    return [
        {"user_id": "stored-0"},
        {"user_id": "stored-1", "history": []},
        {"user_id": "stored-2", "history": histories[7]},
        {"user_id": "stored-3", "history": [{"external_id": sku(histories[8][0])}]},
        {"user_id": "stored-4"},
        {"user_id": "stored-5", "history": histories[9][:1]},
        {"user_id": "stored-0", "history": histories[10]},  # a user twice: read once, answered per line
        {"user_id": "nothing-stored", "history": histories[11]},
        {"history": histories[12]},
    ]


def write_lines(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.mark.parametrize(("mode", "exclude"), [("beam", False), ("beam", True), ("ved", False), ("ved", True)])
def test_stored_history_answers_as_post_recommend_for_the_user(
    make_settings: Callable[..., Settings],
    client: TestClient,
    checkpoint: Path,
    histories: list[list[Any]],
    tmp_path: Path,
    mode: str,
    exclude: bool,
) -> None:
    store_events(client, histories)
    lines = stored_users(histories)
    source, out = write_lines(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    settings = make_settings(checkpoint=checkpoint, warmup=False, cache_ttl_s=0)
    fields = {"k": K, "mode": mode, "budget": None, "exclude_history": exclude}
    store = client.app.state.recommender.store  # type: ignore[attr-defined]  # the app's own: the same events
    report = recommend_file(settings, source, out, fields, batch_size=1, progress=False, store=store)
    assert (report.users, report.stored_users, report.skipped) == (len(lines), 7, 2)  # stored-0's stale entry, twice
    got = [json.loads(line) for line in out.read_text().splitlines()]
    for line, answered in zip(lines, got, strict=True):
        body: dict[str, Any] = {**line, "k": K, "mode": mode, "exclude_history": exclude}
        if mode == "ved":
            body["latency_ms"] = 1000
        answer = client.post("/recommend", json=body).json()
        if mode == "ved":
            assert answer["cap_hit"] is False and answer["search"]["fallback"] is None, answer["search"]
        named = "user_id" in line and line["user_id"] != "nothing-stored"
        assert answer["stored_history"] == ("used" if named else "none")
        assert answered == {"user_id": line.get("user_id"), "items": answer["items"]}, line
    # without the option the same lines are their own histories only: the stored ones changed answers
    given = [line for line in lines if line.get("history")]
    alone = recommend(checkpoint, write_lines(tmp_path / "given.jsonl", given), tmp_path / "alone.jsonl")
    with_stored = [g for line, g in zip(lines, got, strict=True) if line.get("history")]
    assert [a["items"] for a in alone] != [g["items"] for g in with_stored]


def test_stored_history_errors_name_the_line_and_the_user(
    make_settings: Callable[..., Settings], client: TestClient, checkpoint: Path, tmp_path: Path
) -> None:
    settings = make_settings(checkpoint=checkpoint, warmup=False, cache_ttl_s=0)
    fields = {"k": K, "mode": "beam", "budget": None, "exclude_history": None}
    store = client.app.state.recommender.store  # type: ignore[attr-defined]
    not_found = client.post("/recommend", json={"user_id": "nobody-stored"})
    assert not_found.status_code == 404
    # the line's shape is checked before the store is read (the third line's error comes after, with the catalog)
    both = " (2 lines have errors; the first is shown)"
    cases = [
        ({"user_id": "nobody-stored"}, not_found.json()["error"]["message"] + both),  # the service's 404, verbatim
        ({"history": []}, "history: empty: give the user's items, oldest first (item ids, SID strings or "
         '{"external_id": ...} objects), or a user_id whose stored history --stored-history reads'),
        ({"user_id": "u 1", "history": [1]}, "user_id: 'u 1' is no user id the service stores a history under "
         "(1 to 128 of A-Z a-z 0-9 _ . @ : -)"),
    ]  # fmt: skip
    for line, message in cases:
        source = write_lines(tmp_path / "in.jsonl", [{"history": [1, 2]}, line, {"user_id": "nobody-stored"}])
        with pytest.raises(InputError) as e:
            recommend_file(settings, source, tmp_path / "out.jsonl", fields, batch_size=4, progress=False, store=store)
        assert str(e.value) == f"{source}:2: {message}"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]
    assert client.post("/recommend", json={"user_id": "u 1", "history": [1]}).status_code == 422  # as the API


class FailingStore(MemoryStore):
    """A store that refuses every read (Redis answered with an error)."""

    def __init__(self) -> None:
        super().__init__(100, 10, 0, 60)

    async def history(self, user_id: str) -> list[str]:
        raise StoreRefused("read history", "OOM command not allowed when used memory > 'maxmemory'")


def test_a_store_that_fails_stops_the_command_naming_it(
    make_settings: Callable[..., Settings], checkpoint: Path, tmp_path: Path, dead_redis_url: str
) -> None:
    source = write_lines(tmp_path / "in.jsonl", [{"user_id": "a", "history": [1]}, {"user_id": "b"}])
    out = tmp_path / "out.jsonl"
    out.write_text("earlier answers\n")
    settings = make_settings(checkpoint=checkpoint, warmup=False, cache_ttl_s=0)
    fields = {"k": K, "mode": "beam", "budget": None, "exclude_history": None}
    with pytest.raises(StoreError) as e:
        recommend_file(settings, source, out, fields, batch_size=4, progress=False, store=FailingStore())
    assert str(e.value) == (
        "--stored-history: the memory store could not be read (Redis refused the command (read history): OOM "
        "command not allowed when used memory > 'maxmemory'); nothing was written"
    )
    # the command: the store vstar serve would use, Redis down (its password never shown), or behind TLS
    args = ["recommend", "--checkpoint", str(checkpoint), "--input", str(source), "--out", str(out), "--force"]
    down = dead_redis_url.replace("redis://", "redis://vstar:s3cret-pw@")
    error = store_error([*args, "--stored-history"], {"REDIS_URL": down})
    assert error.startswith(f"Error: --stored-history: Redis at {down.replace('s3cret-pw', '***')} could not be read")
    assert f"connecting to 127.0.0.1:{down.rsplit(':', 1)[1].split('/')[0]}" in error and "s3cret" not in error
    assert error.endswith("; nothing was written")
    error = store_error([*args, "--stored-history"], {"REDIS_URL": dead_redis_url.replace("redis", "rediss")})
    assert "; REDIS_URL asks for TLS (rediss://): a port that does not speak TLS never answers" in error
    no_redis = {"REDIS_URL": None, "VSTAR_REDIS_URL": None}
    assert "'--stored-history': needs REDIS_URL (or VSTAR_REDIS_URL)" in one_line_error(
        [*args, "--stored-history"], env=no_redis
    )
    assert out.read_text() == "earlier answers\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]


def store_error(args: list[str], env: dict[str, str | None]) -> str:
    """The command's error: its last line (the progress bar of the reads that failed is on stderr before it)."""
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 2, result.output
    return result.output.strip().splitlines()[-1]


def test_without_the_option_no_store_is_read_and_user_ids_are_labels(
    checkpoint: Path, histories: list[list[Any]], tmp_path: Path, dead_redis_url: str
) -> None:
    """A Redis that is down in the environment changes nothing, a user_id is any string, a history is needed."""
    source = write_users(tmp_path / "in.jsonl", histories[:4])
    args = ["recommend", "--checkpoint", str(checkpoint), "--input", str(source)]
    plain = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "a.jsonl")], env={"REDIS_URL": None})
    beside = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "b.jsonl")], env={"REDIS_URL": dead_redis_url})
    assert plain.exit_code == beside.exit_code == 0, (plain.output, beside.output)
    assert "stored history" not in plain.output + beside.output
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    write_lines(source, [{"user_id": "stored-0"}])
    error = one_line_error([*args, "--out", str(tmp_path / "c.jsonl")], env={"REDIS_URL": dead_redis_url})
    assert error.endswith(
        'in.jsonl:1: history: missing: give the user\'s items, oldest first (item ids, SID strings or {"external_id": '
        "...} objects)"
    )


def test_stored_history_from_redis_answers_as_the_service_on_it(
    make_settings: Callable[..., Settings], checkpoint: Path, histories: list[list[Any]], tmp_path: Path,
    clean_redis: str,
) -> None:  # fmt: skip
    """The command's own store (``REDIS_URL``, one pipeline per chunk of users) against a service on the same Redis."""
    settings = make_settings(checkpoint=checkpoint, cache_ttl_s=0, batch_max_size=1, redis_url=clean_redis)
    lines = stored_users(histories)
    source = write_lines(tmp_path / "in.jsonl", lines)
    with TestClient(create_app(settings)) as c:
        store_events(c, histories)
        args = ["--k", str(K), "--batch-size", "1", "--stored-history"]
        result = CliRunner().invoke(
            app,
            ["recommend", "--checkpoint", str(checkpoint), "--input", str(source), "--out", str(tmp_path / "o"), *args],
            env={"REDIS_URL": clean_redis},
        )
        assert result.exit_code == 0, result.output
        assert "; a stored history for 7 of them, 2 stored entries the catalog no longer knows skipped" in result.output
        got = [json.loads(line) for line in (tmp_path / "o").read_text().splitlines()]
        for line, answered in zip(lines, got, strict=True):
            answer = c.post("/recommend", json={**line, "k": K}).json()
            assert answered == {"user_id": line.get("user_id"), "items": answer["items"]}, line
