"""Issue 20 attacks that need no Ray: artifact paths out of the download directory, pickled
objects offered to the model logger, key files, the rate limiter, a lying Content-Length."""

from __future__ import annotations

import asyncio
import base64
import os
import stat
from pathlib import Path

import pytest
import yaml

from recsys.serving.access import (
    ANONYMOUS,
    AuthConfigError,
    Caller,
    RateLimiter,
    check_auth,
    identify,
    load_keys,
    parse_keys,
)
from recsys.tracking.registry import RegistryError, _export_inside

# -- artifact paths from a model file -------------------------------------------------------------


def _model_dir(root: Path, export_path: str) -> Path:
    """A downloaded pyfunc model whose MLmodel names ``export_path`` as its export artifact."""
    root.mkdir(parents=True)
    mlmodel = {"flavors": {"python_function": {"artifacts": {"export": {"path": export_path}}}}}
    (root / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    return root


def test_an_export_path_inside_the_download_is_accepted(tmp_path: Path) -> None:
    model = _model_dir(tmp_path / "model", "artifacts/export")
    (model / "artifacts" / "export").mkdir(parents=True)
    (model / "artifacts" / "export" / "export.json").write_text("{}")
    assert _export_inside(model, "m v1") == (model / "artifacts" / "export").resolve()


@pytest.mark.parametrize("escape", ["../elsewhere", "/tmp", "artifacts/../../elsewhere"])
def test_an_export_path_out_of_the_download_is_refused(tmp_path: Path, escape: str) -> None:
    """The MLmodel file is written by whoever registered the version: a path out of the
    download directory would make the replica load files an attacker chose."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "export.json").write_text("{}")
    model = _model_dir(tmp_path / "model", escape)
    with pytest.raises(RegistryError, match="outside the download directory"):
        _export_inside(model, "m v1")


def test_a_link_out_of_the_download_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret.key"
    secret.write_text("not for the model")
    model = _model_dir(tmp_path / "model", "export")
    (model / "export").mkdir()
    (model / "export" / "export.json").write_text("{}")
    (model / "export" / "model.safetensors").symlink_to(secret)
    with pytest.raises(RegistryError, match="outside the download directory"):
        _export_inside(model, "m v1")


def test_a_python_object_is_never_logged_as_a_model() -> None:
    """Only models-from-code files are logged: a PythonModel instance would be cloudpickled,
    and unpickled (run) by every replica that loads the version."""
    import mlflow.pyfunc

    from recsys.tracking import runs

    with pytest.raises(TypeError, match="models-from-code"):
        runs.log_pyfunc_model("http://127.0.0.1:9", "run", mlflow.pyfunc.PythonModel(), {})


# -- keys -----------------------------------------------------------------------------------------


def test_key_files_name_scope_and_rate_each_key() -> None:
    keys = parse_keys("# ops\nops 0123456789abcdef0123\nshop 0123456789abcdef9999 shop_a,shop_b 5"
                      "\n\n", "keys")
    assert [(k.name, k.platforms, k.rate_per_s) for k in keys] == [
        ("ops", None, None), ("shop", frozenset({"shop_a", "shop_b"}), 5.0)]
    assert parse_keys("0123456789abcdef0123", "keys")[0].name == "default"
    for bad, message in (("short", "shorter than 16"), ("a 0123456789abcdef0123 * x", "rate"),
                         ("a 0123456789abcdef01\na 0123456789abcdef02", "repeat")):
        with pytest.raises(AuthConfigError, match=message) as e:
            parse_keys(bad, "keys")
        assert "0123456789abcdef" not in str(e.value)  # an error never prints a key


def test_a_key_file_others_can_read_is_refused(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "keys"
    path.write_text("ops 0123456789abcdef0123\n")
    path.chmod(0o644)
    with pytest.raises(AuthConfigError, match="chmod 600"):
        load_keys(path, None)
    path.chmod(0o600)
    monkeypatch.setenv("RECSYS_TEST_KEY", "env-key-0123456789abcdef")
    assert [k.name for k in load_keys(path, "RECSYS_TEST_KEY")] == ["ops", "default"]


def test_auth_fails_closed() -> None:
    with pytest.raises(AuthConfigError, match="auth: none"):
        check_auth("api_key", [])
    check_auth("none", [])
    with pytest.raises(AuthConfigError, match="remove one or the other"):
        check_auth("none", parse_keys("0123456789abcdef0123", "k"))


def test_callers_are_identified_by_header_or_basic_password() -> None:
    keys = parse_keys("ops 0123456789abcdef0123\nshop 0123456789abcdef9999 shop_a", "k")
    assert identify(keys, "0123456789abcdef0123", None) == Caller("ops")
    basic = "Basic " + base64.b64encode(b"me:0123456789abcdef9999").decode()
    shop = identify(keys, None, basic)
    assert shop is not None and shop.may_use("shop_a") and not shop.may_use("shop_b")
    assert identify(keys, "wrong", None) is None and identify(keys, None, None) is None
    assert identify(keys, None, "Basic !!!") is None
    assert not Caller(ANONYMOUS).authenticated


def test_the_rate_limiter_allows_the_rate_and_refuses_beyond(monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    now = [100.0]
    monkeypatch.setattr("recsys.serving.access.time.monotonic", lambda: now[0])
    limiter = RateLimiter(default_rate=0)
    slow, free = Caller("slow", rate_per_s=2), Caller("free")
    assert [limiter.wait_s(slow) for _ in range(3)] == [0, 0, pytest.approx(0.5)]
    assert all(limiter.wait_s(free) == 0 for _ in range(100))  # rate 0: no limit
    now[0] += 0.5
    assert limiter.wait_s(slow) == 0 and limiter.wait_s(slow) > 0


# -- secrets on disk, request bodies --------------------------------------------------------------


def test_secret_files_are_owner_only(tmp_path: Path) -> None:
    from recsys.serving.deploy import secret_file

    path, made = secret_file(tmp_path / "d" / "api_keys")
    assert made and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert parse_keys(path.read_text(), str(path))[0].name == "default"
    again, made_again = secret_file(path)
    assert again == path and not made_again
    loose = tmp_path / "loose.key"
    loose.write_text("x")
    loose.chmod(0o644)
    secret_file(loose, "00ff")
    assert loose.read_text() == "00ff" and stat.S_IMODE(os.stat(loose).st_mode) == 0o600


def test_a_body_longer_than_its_content_length_is_measured() -> None:
    """The body limit does not trust Content-Length: a client declaring 10 bytes and sending
    5000 is refused on the bytes that arrive."""
    from types import SimpleNamespace

    from recsys.serving.http import BodySizeLimit

    seen: list[bytes] = []

    async def app(scope: dict, receive, send) -> None:  # noqa: ANN001
        seen.append((await receive())["body"])

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    chunks = [{"type": "http.request", "body": b"x" * 1000, "more_body": i < 4} for i in range(5)]

    async def receive() -> dict:
        return chunks.pop(0)

    scope = {"type": "http", "method": "POST", "headers": [(b"content-length", b"10")],
             "app": SimpleNamespace(state=SimpleNamespace(max_body_bytes=2048))}
    asyncio.run(BodySizeLimit(app)(scope, receive, send))
    assert seen == [] and sent[0]["status"] == 413
