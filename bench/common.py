"""What every benchmark in ``bench/`` shares: a stderr log, machine facts, CPU and memory sampling
of this process tree, a private Ray cluster, and the small synthetic world with a tiny encoder.

The scripts run as ``python bench/<name>.py``, so ``bench/`` is first on ``sys.path`` and they
import this module as ``common`` (Ray puts the script's folder on its workers' path too). Each
benchmark keeps its own JSON layout: the helpers here return values, the scripts name the keys,
so recorded results still render as they were written.
"""

from __future__ import annotations

import json
import logging
import os
import platform as pyplatform
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Self

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
SEED = 7
SYNTHETIC_PLATFORMS = ["shop_a", "shop_b", "shop_c"]  # what the synthetic source names its shops
SYNTHETIC_PSEUDONYM_KEY = bytes(range(32))  # fixed, public: no key file is read or written
MB = 1024 * 1024
# psutil.cpu_times() fields that count as busy (not idle/iowait), where the platform has them.
BUSY_FIELDS = ("user", "system", "nice", "irq", "softirq", "steal")

Log = Callable[[str], None]


def stderr_log(prefix: str) -> Log:
    """A ``log(msg)`` that prints ``[prefix] msg`` to stderr at once (stdout carries results)."""

    def log(msg: str) -> None:
        print(f"[{prefix}] {msg}", file=sys.stderr, flush=True)

    return log


log = stderr_log("bench")


# -- Machine facts ---------------------------------------------------------------------------------

def loadavg() -> list[float]:
    """1, 5 and 15 minute load averages, rounded for the results files."""
    return [round(x, 2) for x in os.getloadavg()]


def cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo (None where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def package_versions(names: Iterable[str], missing: str | None = None) -> dict[str, str | None]:
    """Installed versions by distribution name, without importing the packages."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = missing
    return out


def source_state() -> dict[str, Any]:
    """The commit the figures came from and whether the tree had local changes (a figure
    "from a clean clone" has ``dirty: False``); ``None`` fields outside a git checkout."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                                 timeout=30, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip()

    # A benchmark's own results files do not make the source dirty (a multi-part run writes them
    # between parts).
    status = git("status", "--porcelain", "--", ".",
                 ":(exclude)bench/results")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def machine_info(packages: Iterable[str], **extra: Any) -> dict[str, Any]:
    """Date, CPUs, memory, Python and platform, then ``extra``, then the packages' versions."""
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": source_state(),
        "cpu_count_logical": os.cpu_count(),
        "cpu_count_physical": psutil.cpu_count(logical=False),
        "cpu_model": cpu_model(),
        "memory_total_gb": round(psutil.virtual_memory().total / 1024**3, 1),
        "python": pyplatform.python_version(),
        "platform": pyplatform.platform(),
        **extra,
        "versions": package_versions(packages),
    }


def fmt(x: float | None, spec: str = ".2f") -> str:
    """A number for a Markdown table; ``n/a`` for a run that did not happen (None or NaN)."""
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, spec)


def write_json(path: Path, obj: Any) -> None:
    """A results file: indented, newline-terminated; what JSON cannot hold is written as str."""
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def save_results(out: Path, name: str, result: dict[str, Any],
                 write_markdown: Callable[[Path, dict[str, Any]], None], log: Log) -> None:
    """``name.json`` and its rendering ``name.md`` under ``out``; the Markdown also to stdout."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{name}.json", result)
    write_markdown(out / f"{name}.md", result)
    log(f"wrote {out / f'{name}.json'} and {out / f'{name}.md'} "
        f"in {result['total_seconds']:.0f} s")
    print((out / f"{name}.md").read_text())


# -- CPU and memory of this process tree -----------------------------------------------------------

def cpu_seconds(proc: psutil.Process) -> float:
    """User + system CPU seconds of one process (all its threads)."""
    t = proc.cpu_times()
    return t.user + t.system


def machine_cpu_since(start: Any) -> tuple[float, float]:
    """Busy and niced CPU seconds of the whole machine since ``start`` (``psutil.cpu_times()``)."""
    end = psutil.cpu_times()
    busy = sum(getattr(end, f) - getattr(start, f) for f in BUSY_FIELDS if hasattr(end, f))
    nice = getattr(end, "nice", 0.0) - getattr(start, "nice", 0.0)
    return busy, nice


def is_ray_worker(cmdline: str) -> bool:
    """Task/actor worker processes (``ray::IDLE``, ``ray::MapBatches(...)``, Ray Data's
    ``ray::_StatsActor``...), by the process title Ray sets, or the worker script at start-up;
    Ray's agents carry a ``ray::`` title too but are system processes."""
    if cmdline.startswith(("ray::DashboardAgent", "ray::RuntimeEnvAgent")):
        return False
    return cmdline.startswith("ray::") or "default_worker.py" in cmdline


class TreeSampler:
    """CPU seconds of this process, of its descendants and of the whole machine during a
    ``with`` block. Descendants are sampled every ``interval`` s by a thread, because Ray's
    workers exit before the block ends; with ``classify`` (command line -> group) their RSS is
    summed per group at each sample too. Subclasses turn the figures into their JSON."""

    def __init__(self, interval: float, classify: Callable[[str], str] | None = None) -> None:
        self.interval = interval
        self.classify = classify
        self.me = psutil.Process()
        self._stop = threading.Event()
        self._procs: dict[int, psutil.Process] = {}
        self._cpu_start: dict[int, float] = {}
        self._cpu_last: dict[int, float] = {}
        self._group: dict[int, str] = {}

    def _scan(self, first: bool = False) -> dict[str, int]:
        """Reads every descendant's CPU seconds; returns RSS bytes per group (with classify)."""
        rss: dict[str, int] = {}
        try:
            children = self.me.children(recursive=True)
        except psutil.Error:
            return rss
        for child in children:
            pid = child.pid
            proc = self._procs.setdefault(pid, child)
            group, mem = "descendants", 0
            try:
                with proc.oneshot():
                    if self.classify is not None:
                        group = self.classify(" ".join(proc.cmdline()))
                        mem = proc.memory_info().rss
                    cpu = cpu_seconds(proc)
            except psutil.Error:  # exited between listing and reading: its last reading stands
                continue
            self._group[pid] = group
            if first:
                self._cpu_start[pid] = cpu
            self._cpu_start.setdefault(pid, 0.0)  # born during the measurement
            self._cpu_last[pid] = cpu
            rss[group] = rss.get(group, 0) + mem
        return rss

    def sample(self, first: bool = False) -> None:
        """One sample; subclasses that track memory override it."""
        self._scan(first)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> Self:
        self.loadavg_start = loadavg()
        self.driver_cpu_start = cpu_seconds(self.me)
        self.machine_start = psutil.cpu_times()
        self.sample(first=True)
        self.t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.t0
        self._stop.set()
        self._thread.join()
        self.sample()
        self.driver_cpu_s = cpu_seconds(self.me) - self.driver_cpu_start
        self.group_cpu_s: dict[str, float] = {}
        for pid, last in self._cpu_last.items():
            group = self._group[pid]
            used = max(0.0, last - self._cpu_start.get(pid, 0.0))
            self.group_cpu_s[group] = self.group_cpu_s.get(group, 0.0) + used
        self.machine_busy_s, self.machine_nice_s = machine_cpu_since(self.machine_start)


class CpuMeter(TreeSampler):
    """Wall time, load average and CPU seconds of a measurement: this process, its descendants
    (Ray's processes and workers), and the rest of the machine (``other``: the background load).
    ``summary`` is the dict ``train_speed.json`` records per run."""

    def __init__(self, interval: float = 1.0) -> None:
        super().__init__(interval)

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        children = self.group_cpu_s.get("descendants", 0.0)
        self.summary = {
            "wall_s": round(self.wall, 2),
            "loadavg_start": self.loadavg_start, "loadavg_end": loadavg(),
            "cpu_s": {"driver": round(self.driver_cpu_s, 2), "descendants": round(children, 2),
                      "machine_busy": round(self.machine_busy_s, 2),
                      "machine_nice": round(self.machine_nice_s, 2),
                      "other": round(max(0.0, self.machine_busy_s - self.driver_cpu_s
                                         - children), 2),
                      "machine_capacity": round(self.wall * (os.cpu_count() or 1), 2)},
        }


class RayMemoryMonitor(TreeSampler):
    """Peak RSS of this process (the driver), of its Ray worker processes and of Ray's system
    processes (raylet, GCS, dashboard, agents), plus each group's CPU seconds: ``memory()`` and
    ``cpu`` are the dicts ``ingest.json`` records per measurement. ``driver_plus_workers`` is
    taken at one instant, so it is not the sum of the two peaks."""

    def __init__(self, interval: float) -> None:
        super().__init__(interval, lambda cmd: "workers" if is_ray_worker(cmd) else "system")
        self.peak = {"driver": 0, "workers": 0, "system": 0, "driver_plus_workers": 0}
        self.samples = 0

    def sample(self, first: bool = False) -> None:
        try:
            driver = self.me.memory_info().rss
        except psutil.Error:
            driver = 0
        rss = self._scan(first)
        workers, system = rss.get("workers", 0), rss.get("system", 0)
        pk = self.peak
        pk["driver"] = max(pk["driver"], driver)
        pk["workers"] = max(pk["workers"], workers)
        pk["system"] = max(pk["system"], system)
        pk["driver_plus_workers"] = max(pk["driver_plus_workers"], driver + workers)
        self.samples += 1
        if first:
            self.workers_start = pk["workers"]

    def __enter__(self) -> Self:
        self.rss_start = self.me.memory_info().rss
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        workers = self.group_cpu_s.get("workers", 0.0)
        system = self.group_cpu_s.get("system", 0.0)
        self.cpu = {"driver_s": round(self.driver_cpu_s, 3), "ray_workers_s": round(workers, 3),
                    "ray_system_s": round(system, 3),
                    "machine_busy_s": round(self.machine_busy_s, 3),
                    "machine_cores": psutil.cpu_count()}
        own = self.driver_cpu_s + workers + system
        self.cpu["other_processes_s"] = round(max(0.0, self.machine_busy_s - own), 3)

    def memory(self) -> dict[str, float]:
        out = {f"peak_{k}_mb": round(v / MB, 1) for k, v in self.peak.items()}
        out["driver_start_mb"] = round(self.rss_start / MB, 1)
        out["driver_growth_mb"] = round((self.peak["driver"] - self.rss_start) / MB, 1)
        out["workers_start_mb"] = round(self.workers_start / MB, 1)
        out["workers_growth_mb"] = round((self.peak["workers"] - self.workers_start) / MB, 1)
        out["samples"] = self.samples
        return out


class Niceness:
    """Run a block of this process at another niceness (every thread: Linux nice is per
    thread), then restore it. Ray starts its workers at ``worker_niceness`` (15 by default), so
    on a busy machine a nice-0 plain process would get more CPU than the Ray worker it is
    compared with. Restoring a lower niceness needs root; otherwise the process stays niced."""

    def __init__(self, nice: int, log: Log = log) -> None:
        self.nice = nice
        self.log = log
        self.before: dict[int, int] = {}

    @staticmethod
    def _tids() -> list[int]:
        return [int(t) for t in os.listdir("/proc/self/task")]

    def __enter__(self) -> Niceness:
        for tid in self._tids():
            try:
                self.before[tid] = os.getpriority(os.PRIO_PROCESS, tid)
                os.setpriority(os.PRIO_PROCESS, tid, self.nice)
            except OSError:  # a thread that ended since the listing; `applied` shows the result
                continue
        self.applied = os.getpriority(os.PRIO_PROCESS, 0)
        return self

    def __exit__(self, *exc: object) -> None:
        for tid in self._tids():
            try:
                os.setpriority(os.PRIO_PROCESS, tid, self.before.get(tid, 0))
            except OSError as e:
                self.log(f"could not restore the niceness of thread {tid}: {e}")


# -- A private Ray cluster -------------------------------------------------------------------------

def drop_ray_address(log: Log = log) -> None:
    """Forget any cluster address in the environment: a benchmark always measures its own
    private local cluster, never one that another job on the machine started."""
    for var in ("RAY_ADDRESS", "RECSYS_RAY_ADDRESS"):
        if os.environ.pop(var, None):
            log(f"ignoring ${var}: the benchmark starts its own local Ray")


def no_progress_bars() -> None:
    """Ray Data's progress bars would interleave with the benchmark's log on stderr."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False


def start_private_ray(log: Log = log) -> None:
    """A private local 2-CPU cluster on loopback (never joins another cluster on the machine),
    with the dashboard on; retried, because on a busy machine the node's start-up can time out."""
    drop_ray_address(log)
    import ray

    from recsys.cluster import LOOPBACK, loopback_env, quiet_ray_data

    for key, value in loopback_env().items():
        os.environ.setdefault(key, value)
    quiet_ray_data()
    for attempt in range(3):
        try:
            ray.init(address="local", num_cpus=2, include_dashboard=True,
                     dashboard_host=LOOPBACK, _node_ip_address=LOOPBACK,
                     logging_level=logging.WARNING)
            break
        except Exception as exc:
            log(f"ray.init failed ({type(exc).__name__}: {str(exc)[:120]}), attempt {attempt + 1}")
            ray.shutdown()
            if attempt == 2:
                raise
            time.sleep(10)
    no_progress_bars()


# -- The small synthetic world ---------------------------------------------------------------------

def save_tiny_encoder(out: Path, seed: int = SEED) -> str:
    """A random 1-layer BERT with MiniLM's tokenizer and MiniLM's width (384): same token ids
    and the same text-vector size as ``bundled:all-MiniLM-L6-v2`` (so the item tower costs the
    same), but the one-off encoding of the catalogs takes seconds, not minutes, on 2 cores.
    (tests/conftest.py builds a narrower one: there only the code path matters, not the cost.)"""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from recsys.data.catalog import BUNDLED_ENCODER, resolve_encoder_path

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(resolve_encoder_path(BUNDLED_ENCODER))
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=384, num_hidden_layers=1,
                     num_attention_heads=6, intermediate_size=512, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def build_synthetic_examples(tmp: Path, scale: float, encoder: str) -> Any:
    """The synthetic world (``SYNTHETIC_PLATFORMS``) at ``scale`` -> ``tmp/lake`` ->
    ``tmp/examples`` (history up to 50, texts tokenised to 64 by ``encoder``); the ExampleSet."""
    from recsys.data.examples import DataConfig, build_example_set
    from recsys.data.ingest.runner import IngestOptions, ingest
    from recsys.data.pseudonym import Pseudonymizer

    ingest(IngestOptions(source="synthetic", out=tmp / "lake", scale=scale, seed=SEED,
                         num_platforms=len(SYNTHETIC_PLATFORMS)),
           Pseudonymizer(SYNTHETIC_PSEUDONYM_KEY))
    return build_example_set(DataConfig(
        lake=str(tmp / "lake"), examples=str(tmp / "examples"),
        sequences={"max_seq_len": 50}, text={"encoder": encoder, "max_tokens": 64}))


def wait_ready(url: str, timeout: float = 120) -> None:
    """Poll ``url`` until it answers 200 (a Serve app's /readyz); TimeoutError after ``timeout``."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not ready in {timeout} s")
        time.sleep(0.5)

