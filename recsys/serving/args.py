"""The app's ``args`` (serve/config.yaml) and what a replica builds from them: the predictor
of the configured model, with the lake's histories and the pseudonym key."""

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from recsys.config import StrictModel
from recsys.data.pseudonym import DEFAULT_KEY_FILE, KEY_ENV, KEY_FILE_ENV, Pseudonymizer, load_key
from recsys.serving.canary import CanaryArgs
from recsys.serving.model_source import is_registry_uri
from recsys.serving.predictor import Predictor
from recsys.serving.rules import ServingRules
from recsys.serving.schemas import PLATFORM_PATTERN
from recsys.settings import get_settings

REPO_ROOT = Path(__file__).resolve().parents[2]


class FeedbackArgs(StrictModel):
    """The impression and feedback log (``recsys.serving.feedback``): every answer of /recommend
    and every POST /feedback, as Parquet files that ingest source ``feedback`` reads."""

    dir: str | None = Field(None, description="where the files go, one directory per platform "
                            "(relative paths: to the repo root); null: no log, and /feedback "
                            "answers 404")
    queue_size: int = Field(10_000, ge=1, le=1_000_000, description="answers and events held "
                            "in memory per gateway replica; beyond, new ones are dropped and "
                            "counted (recsys_feedback_dropped), never waited for")
    flush_every: int = Field(5_000, ge=1, description="rows per file: a file is written when "
                             "this many are waiting")
    flush_interval_s: float = Field(10.0, gt=0, le=3600, description="and at the latest this "
                                    "long after the last file (and at shutdown)")


class AppArgs(StrictModel):
    """The app's ``args`` in serve/config.yaml (or ``serve run ... key=value``)."""

    model_uri: str = Field(
        "models:/recsys-{platform}@champion",
        description="models:/<name>@<alias> / models:/<name>/<version> in the MLflow registry, "
                    "or a training run's export dir (relative paths: to the repo root); with "
                    "{platform} in it, each platform is served by its own model (its own "
                    "champion), loaded on the platform's first request")
    platforms: list[Annotated[str, Field(pattern=PLATFORM_PATTERN)]] = Field(
        default_factory=list, description="platforms whose models "
                                 "every replica loads at start (/readyz waits for them); others "
                                 "load on their first request")
    max_models_per_replica: int = Field(4, ge=1, le=64, description="models one replica holds "
                                        "at most; the least recently used is unloaded beyond")
    lake: str | None = Field("runs/demo/lake", description="lake with the users' events "
                             "(histories, purchases, popular items); null: none")
    tracking_uri: str | None = Field(None, description="MLflow server for models:/ uris "
                                     "(default: $RECSYS_MLFLOW_TRACKING_URI, else the local "
                                     "server the jobs started under runs/mlflow)")
    poll_interval_s: float = Field(30.0, ge=0, description="how often a replica checks the "
                                   "alias for a new version (0: never); swaps without downtime")
    search: bool = Field(True, description="load the text encoder for /search")
    int8_search: bool = Field(False, description="the /search query encoder's Linear layers in "
                              "int8 (about 2x faster on CPU; top-10 agreement with fp32 about "
                              "0.8: bench/results/scale_serving.md)")
    approximate_index: bool = Field(True, description="use an export's approximate index "
                                    "(faiss, built for catalogs above ann_threshold items); "
                                    "false: score every item exactly")
    max_batch_size: int = Field(16, ge=1, le=256, description="user-tower batch (1: no "
                                "batching)")
    batch_wait_timeout_s: float = Field(0.002, ge=0, le=1.0)
    torch_threads: int = Field(1, ge=0, description="intra-op threads per replica (0: torch's "
                               "default)")
    auth: Literal["api_key", "none"] = Field(
        "api_key", description="api_key: every endpoint but /healthz and /readyz needs a key, "
        "and the app refuses to start without one; none: no keys (a loopback demo only)")
    api_key_file: str | None = Field(None, description="file of API keys, mode 0600 (format: "
                                     "recsys.serving.access), e.g. a mounted k8s Secret")
    api_key_env: str = Field("RECSYS_API_KEY", description="environment variable with one "
                             "more key (the process's own env, never a runtime_env)")
    rate_limit_per_s: float = Field(50.0, ge=0, description="requests per second per key and "
                                    "gateway replica (0: none); a key file line may set its own")
    rules: ServingRules = Field(default_factory=ServingRules, description="ranking rules per "
                                "platform, `default` for the others (recsys.serving.rules: "
                                "session items, repurchase, reasons): server rules, never request "
                                "fields, so that no caller can switch one off and compare the "
                                "answers to learn what a user bought")
    reload_backoff_max_s: float = Field(600.0, ge=0, description="longest wait before a "
                                        "replica tries again a champion that failed to load")
    max_body_bytes: int = Field(64 * 1024, ge=1024, le=16 * 1024 * 1024)
    download_dir: str | None = Field(None, description="where registry models are downloaded "
                                     "(default: a temporary directory)")
    retries: int = Field(2, ge=0, le=5, description="times the gateway repeats a model call "
                         "whose replica died mid-request (reads only, so safe to repeat)")
    canary: CanaryArgs = Field(default_factory=CanaryArgs, description="send a share of "
                               "each platform's users to its @challenger (recsys.serving.canary)")
    feedback: FeedbackArgs = Field(default_factory=FeedbackArgs, description="log every "
                                   "answer's impressions and the clicks, carts and purchases "
                                   "posted to /feedback (pseudonymised), for ingest and the "
                                   "drift monitor")


def local_path(path: str) -> Path:
    """Relative paths in the config mean the repo root (replicas may run elsewhere), unless
    they exist relative to the current directory."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p.resolve()
    return REPO_ROOT / p


def tracking_uri(args: AppArgs) -> str | None:
    """The registry to read: the app's ``tracking_uri``, ``$RECSYS_MLFLOW_TRACKING_URI``, else
    the local server that the jobs started (``<work_dir>/mlflow/server.json``), if it is up.
    Never starts a server: a replica must not own the registry."""
    from recsys.tracking.server import default_root, read_detached

    settings = get_settings()
    uri = args.tracking_uri or settings.mlflow_tracking_uri
    if uri:
        return uri
    info = read_detached(local_path(str(default_root(settings))))
    return str(info["uri"]) if info else None


def serving_pseudonymizer() -> Pseudonymizer:
    """The key that pseudonymised the lake: $RECSYS_PSEUDONYM_KEY, $RECSYS_PSEUDONYM_KEY_FILE,
    else the repo's .recsys/pseudonym.key (a replica's working directory may be elsewhere).
    Never creates one: raises when there is none."""
    key_file = None
    if not os.environ.get(KEY_ENV) and not os.environ.get(KEY_FILE_ENV):
        key_file = local_path(str(DEFAULT_KEY_FILE))
    return Pseudonymizer(*load_key(create_if_missing=False, key_file=key_file))


def load_predictor(args: AppArgs, uri: str | None = None) -> Predictor:
    """The model ``uri`` (default: the app's ``model_uri``) with the app's lake, key and rules
    (a registry uri is resolved and downloaded)."""
    uri = uri or args.model_uri
    tracking = tracking_uri(args)
    lake = local_path(args.lake) if args.lake else None
    pseudonymizer = serving_pseudonymizer() if lake is not None else None
    if is_registry_uri(uri):
        return Predictor.from_model_uri(uri, lake, tracking_uri=tracking,
                                        download_dir=args.download_dir, search=args.search,
                                        pseudonymizer=pseudonymizer, rules=args.rules,
                                        int8_search=args.int8_search,
                                        approximate=args.approximate_index)
    return Predictor.from_export(local_path(uri), lake, search=args.search,
                                 pseudonymizer=pseudonymizer, rules=args.rules,
                                 int8_search=args.int8_search, approximate=args.approximate_index)
