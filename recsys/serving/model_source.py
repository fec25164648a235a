"""What a replica serves: the one resolver from a model uri to an export directory on local disk.

A model uri is a training run's export directory, ``models:/<name>@<alias>`` or
``models:/<name>/<version>``. Registry uris are resolved through ``recsys.tracking.registry``
(its alias lookup, its download), so this module holds only the uri grammar and the local case;
mlflow is imported only when a registry uri is resolved, which keeps the predictor's tests and a
local-export replica free of it.

Why here and not in the registry module: the resolver serves the serving side (``ModelSource``
is what ``/model`` reports), handles local paths that never touch MLflow, and the registry module
imports mlflow at import time.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

MODELS_SCHEME = "models:/"


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: the export directory on local disk and what it was resolved from."""

    uri: str
    export_path: Path
    name: str
    version: str | None = None
    alias: str | None = None
    download_root: Path | None = None
    """The directory a registry version was downloaded into (None: a local export)."""

    def discard(self) -> None:
        """Remove the downloaded files (a model that failed to load, or was swapped out)."""
        if self.download_root is not None:
            shutil.rmtree(self.download_root, ignore_errors=True)


class RegistryRef(NamedTuple):
    """A parsed registry uri; exactly one of ``version`` and ``alias`` is set."""

    name: str
    version: str | None
    alias: str | None


def is_registry_uri(uri: str) -> bool:
    return uri.startswith(MODELS_SCHEME)


def parse_models_uri(uri: str) -> RegistryRef:
    """``models:/name@alias`` -> (name, None, alias); ``models:/name/3`` -> (name, "3", None)."""
    rest = uri[len(MODELS_SCHEME):] if is_registry_uri(uri) else ""
    if "@" in rest:
        name, alias = rest.split("@", 1)
        if name and alias and "/" not in rest:
            return RegistryRef(name, None, alias)
    elif rest.count("/") == 1:
        name, version = rest.split("/")
        if name and version.isdigit():
            return RegistryRef(name, version, None)
    raise ValueError(f"model uri {uri!r}: expected models:/<name>@<alias> or "
                     "models:/<name>/<version>")


def registry_version(ref: RegistryRef, tracking_uri: str) -> str:
    """The version ``ref`` names now: its own, or the one its alias points at (an error naming
    both if the alias points nowhere). The alias watcher asks this on every poll."""
    if ref.alias is None:
        assert ref.version is not None  # parse_models_uri sets one of the two
        return ref.version
    from recsys.tracking.registry import alias_version

    version = alias_version(tracking_uri, ref.name, ref.alias)
    if version is None:
        raise LookupError(f"models:/{ref.name}@{ref.alias} does not exist on {tracking_uri} "
                          "(register a version and set the alias, or serve a local export path)")
    return version


def resolve_model(uri: str, tracking_uri: str | None = None,
                  download_dir: str | Path | None = None) -> ModelSource:
    """A local export directory, or a registry uri downloaded from MLflow. The alias is resolved
    to a version first, so the files fetched are those of one version even if the alias moves
    during the download."""
    if not is_registry_uri(uri):
        path = Path(uri)
        if not (path / "export.json").is_file():
            raise FileNotFoundError(f"model {uri!r}: {path / 'export.json'} not found (expected "
                                    "a training run's <output_dir>/<name>/export, or "
                                    "models:/<name>@<alias>)")
        return ModelSource(uri=uri, export_path=path.resolve(), name=path.resolve().parent.name)
    if tracking_uri is None:
        raise ValueError(f"model {uri!r} is a registry uri but no MLflow tracking uri is set "
                         "(RECSYS_MLFLOW_TRACKING_URI or the app's tracking_uri)")
    ref = parse_models_uri(uri)
    version = registry_version(ref, tracking_uri)
    from recsys.tracking.registry import download_export

    if download_dir is not None:
        Path(download_dir).mkdir(parents=True, exist_ok=True)
    # A fresh directory per download: removed as a whole when the version is discarded.
    root = Path(tempfile.mkdtemp(prefix=f"{ref.name}-v{version}-", dir=download_dir))
    try:
        export = download_export(tracking_uri, ref.name, version, root)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return ModelSource(uri=uri, export_path=export, name=ref.name, version=version,
                       alias=ref.alias, download_root=root)
