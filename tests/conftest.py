"""Shared fixtures. Tiers: tests/unit (no Ray), tests/integration (real local Ray/MLflow/Serve),
and anything marked ``slow`` (run with ``make test-slow``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import recsys  # noqa: F401  (before anything imports ray: keeps test clusters on 127.0.0.1)

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """``../shared/data`` beside the checkout, or ``$RECSYS_SHARED_DATA``."""
    return Path(os.environ.get("RECSYS_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"real datasets not available: {path} is absent (set RECSYS_SHARED_DATA)")
    return path


@pytest.fixture(autouse=True, scope="session")
def _pseudonym_key():
    """A fixed key so that tests never create key files in the working tree (session-wide, so
    module- and session-scoped fixtures see it too)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RECSYS_PSEUDONYM_KEY", "00112233445566778899aabbccddeeff")
        yield


@pytest.fixture(scope="module")
def monkeypatch_module():
    """``monkeypatch`` for module-scoped fixtures (environment of a shared server, ...)."""
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster (2 logical CPUs, loopback only), shut down after the session."""
    import ray

    from recsys.cluster import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random BERT with MiniLM's tokenizer, saved as a local model path.

    Integration tests train through the same code paths as the bundled MiniLM (any local
    AutoModel path must work) without spending a minute encoding item texts on 2 cores.
    """
    from transformers import AutoTokenizer, BertConfig, BertModel

    from recsys.data.catalog import BUNDLED_ENCODER, resolve_encoder_path

    out = tmp_path_factory.mktemp("tiny-encoder")
    tok = AutoTokenizer.from_pretrained(resolve_encoder_path(BUNDLED_ENCODER))
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def synthetic_examples(ray_cluster, tiny_encoder: str, tmp_path_factory: pytest.TempPathFactory):
    """Three synthetic shops -> lake -> example set (tokenised with the tiny encoder)."""
    from recsys.data.examples import DataConfig, build_example_set
    from recsys.data.ingest.runner import IngestOptions, ingest
    from recsys.data.pseudonym import Pseudonymizer

    root = tmp_path_factory.mktemp("synthetic")
    ingest(IngestOptions(source="synthetic", out=root / "lake", scale=0.2, seed=11),
           Pseudonymizer(bytes(range(32))))
    return build_example_set(DataConfig(
        lake=str(root / "lake"), examples=str(root / "examples"),
        sequences={"collapse_repeats": True, "max_seq_len": 20},
        text={"encoder": tiny_encoder, "max_tokens": 32}))


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real MLflow tracking server (SQLite) on 127.0.0.1 for the whole session."""
    from recsys.tracking.server import LocalMlflowServer

    server = LocalMlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    yield server
    server.stop()
