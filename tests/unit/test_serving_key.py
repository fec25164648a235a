"""Serving and the lake's pseudonym key: another key is refused at start (not "no history" for
everyone), an old lake without a recorded fingerprint only warns, and a request's user id is
normalised exactly as ingest normalised it (``recsys.serving.predictor.Predictor.from_export``,
``Predictor._histories``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recsys.data.lake import KeyMismatchError, list_platforms, platform_dir
from recsys.data.pseudonym import KEY_ENV, Pseudonymizer
from recsys.serving.predictor import Predictor
from recsys.serving.toy import ToyWorld, build_toy_world

PSEUDO = Pseudonymizer(bytes.fromhex("00112233445566778899aabbccddeeff"))

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tiny_encoder: str, tmp_path_factory: pytest.TempPathFactory) -> ToyWorld:
    return build_toy_world(tmp_path_factory.mktemp("toy-key"), tiny_encoder, PSEUDO)


def _record_fingerprint(lake: Path, fingerprint: str | None, source: str = "$SOME_KEY") -> None:
    """Write (or remove) the key fingerprint in every platform's report, as ingest does."""
    for name in list_platforms(lake):
        path = platform_dir(lake, name) / "report.json"
        report = json.loads(path.read_text())
        report.pop("pseudonym_key_fingerprint", None)
        report.pop("pseudonym_key_source", None)
        if fingerprint is not None:
            report.update(pseudonym_key_fingerprint=fingerprint, pseudonym_key_source=source)
        path.write_text(json.dumps(report))


def test_another_key_refuses_to_start(world: ToyWorld) -> None:
    _record_fingerprint(world.lake, PSEUDO.fingerprint, "$RECSYS_PSEUDONYM_KEY at ingest")
    other = Pseudonymizer(b"z" * 32, "/etc/recsys/other.key")
    with pytest.raises(KeyMismatchError) as err:
        Predictor.from_export(world.export, world.lake, pseudonymizer=other, search=False)
    msg = str(err.value)
    assert PSEUDO.fingerprint in msg and other.fingerprint in msg
    assert "/etc/recsys/other.key" in msg and "at ingest" in msg


def test_key_loaded_from_env_is_named_when_refused(world: ToyWorld,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    _record_fingerprint(world.lake, PSEUDO.fingerprint)
    monkeypatch.setenv(KEY_ENV, "ff" * 16)
    with pytest.raises(KeyMismatchError, match=rf"\${KEY_ENV}"):
        Predictor.from_export(world.export, world.lake, search=False)


def test_old_lake_without_fingerprint_warns_and_serves(world: ToyWorld,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    _record_fingerprint(world.lake, None)
    p = Predictor.from_export(world.export, world.lake, pseudonymizer=PSEUDO, search=False)
    assert "recorded no pseudonym key fingerprint" in caplog.text
    assert p.history.num_users > 0


@pytest.mark.parametrize("spelling", ["alice", " alice ", "\u00a0alice\t", "\uff41lice"])
def test_request_ids_normalised_as_at_ingest(world: ToyWorld, spelling: str) -> None:
    _record_fingerprint(world.lake, PSEUDO.fingerprint)
    p = Predictor.from_export(world.export, world.lake, pseudonymizer=PSEUDO, search=False)
    assert p._histories(spelling) == p._histories("alice") != {}
    assert p._histories("Alice") == {}  # ids keep their case (see normalise_id)
