"""Registry at scale (format v2): one more push and a cold route at 1,000 / 10,000 / 100,000 experts.

Stated configuration: a local Hub (``moin_hub.LocalHub``) on loopback; per size, a v2 registry whose rows are
written directly (synthetic 384-d centroids around ``--clusters`` centres, cosine ~0.82 to their centre; no
training, no expert repos) and compacted (k-means cells, ids file, coarse file). Every measured client is a
fresh process with an empty HF cache talking to the Hub through a byte-counting TCP proxy:

- push: ``update_registry(upsert_expert(row))`` of one new synthetic row (the registry side of
  ``moin-hub push-expert``; the expert repo's own commit does not depend on the registry's size): seconds
  of the call, bytes sent to (uploaded) and received from the Hub, the client's peak RSS;
- cold route: ``Router.from_registry(...).route_vector(q, k=3)`` for a query near one expert, from nothing
  cached (the query embedding is excluded: the embedder's download and load do not depend on the
  registry's size): seconds, bytes downloaded, peak RSS, whether it used the partial (cells) index.

Targets: push at 100k <= 2x push at 1k; cold route at 100k <= 2x at 1k; bytes uploaded per push
independent of the registry's size (largest <= 1.1x smallest). Prints one table and met / NOT met per
target; exit code 1 on a miss. ``--json FILE`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
from _common import exit_code, met  # noqa: E402

DIM = 384
ROOT = Path(__file__).resolve().parents[1]


class CountingProxy:
    """A TCP proxy on loopback that counts the bytes each way (client -> Hub = up, Hub -> client = down)."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.up = self.down = 0
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        with self._lock:
            self.up = self.down = 0

    def _accept(self) -> None:
        while True:
            client, _ = self._server.accept()
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pipe, args=(client, upstream, "up"), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, "down"), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, direction: str) -> None:
        try:
            while data := source.recv(1 << 16):
                with self._lock:
                    setattr(self, direction, getattr(self, direction) + len(data))
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, clusters: int, rng: np.random.Generator) -> np.ndarray:
    centres = unit(rng.standard_normal((clusters, DIM)))
    return unit(centres[rng.integers(0, clusters, n)] + rng.standard_normal((n, DIM)).astype(np.float32)
                * (0.7 / np.sqrt(DIM)))


def synthetic_table(vectors: np.ndarray):  # noqa: ANN201 - pyarrow.Table
    """Registry rows written directly: ids, repos, a pinned revision, the centroid, four file digests."""
    import pyarrow as pa

    from moin_hub.hub.rows import EXPERTS_SCHEMA

    n = len(vectors)
    ids = [f"x{i:06d}" for i in range(n)]
    files = [[{"path": name, "sha256": f"{i:064x}", "size": 1000} for name in
              ("adapter_config.json", "adapter_model.safetensors", "centroid.safetensors", "moin_expert.json")]
             for i in range(n)]
    columns = {
        "expert_id": pa.array(ids), "repo_id": pa.array([f"bench/{i}" for i in ids]),
        "revision": pa.array([f"{i:040x}" for i in range(n)]),
        "centroid": pa.ListArray.from_arrays(pa.array(np.arange(n + 1) * DIM, pa.int32()),
                                             pa.array(vectors.reshape(-1), pa.float32())),
        "keywords": pa.array([["synthetic", f"topic{i % 997}"] for i in range(n)]),
        "files": pa.array(files, EXPERTS_SCHEMA.field("files").type),
        "n_docs": pa.array(np.full(n, 40)), "lora_rank": pa.array(np.full(n, 8, np.int32)),
    }
    return pa.table({f.name: columns.get(f.name, pa.nulls(n, f.type)) for f in EXPERTS_SCHEMA}, schema=EXPERTS_SCHEMA)


PUSH = """
import json, sys, time
import numpy as np
def hwm():  # peak RSS of this process in MB (VmHWM restarts at exec, unlike ru_maxrss)
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024
from moin_hub.hub.config import ExpertRecord
from moin_hub.hub.registry import update_registry, upsert_expert
registry, endpoint, vector = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
row = ExpertRecord(expert_id="pushed-1", repo_id="bench/pushed-1", revision="f" * 40, centroid=vector)
start = time.perf_counter()
updated = update_registry(registry, upsert_expert(row), commit_message="bench push", endpoint=endpoint)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "n": len(updated), "rss_mb": hwm()}))
"""

ROUTE = """
import json, sys, time
import numpy as np
def hwm():  # peak RSS of this process in MB (VmHWM restarts at exec, unlike ru_maxrss)
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024
from moin_hub import Router
registry, endpoint, query = sys.argv[1], sys.argv[2], np.asarray(json.loads(sys.argv[3]), dtype=np.float32)
start = time.perf_counter()
router = Router.from_registry(registry, endpoint=endpoint)
result = router.route_vector(query, k=3)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "expert": result.best.expert.expert_id, "index": router.index.kind,
                  "rss_mb": hwm()}))
"""


def run_client(code: str, args: list[str], home: Path, proxy: CountingProxy) -> dict:
    env = {**os.environ, "HF_HOME": str(home), "PYTHONPATH": str(ROOT)}
    env.pop("HF_HUB_CACHE", None)
    proxy.reset()
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                          timeout=900, check=False)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    time.sleep(0.2)  # let the proxy threads count the last bytes
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "up": proxy.up, "down": proxy.down}


def mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000], help="Registry sizes.")
    parser.add_argument("--clusters", type=int, default=2_000, help="Cluster centres of the synthetic centroids.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the numbers here.")
    args = parser.parse_args()

    from huggingface_hub import HfApi

    from moin_hub import LocalHub, init_registry
    from moin_hub.hub.compaction import write_rows

    rng = np.random.default_rng(0)
    results = []
    with tempfile.TemporaryDirectory() as tmp, LocalHub(Path(tmp) / "hub") as hub:
        api = HfApi(endpoint=hub.url)
        for repo in ("bench/base", "bench/embedder"):
            api.create_repo(repo)
            api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id=repo)
        proxy = CountingProxy(hub.port)
        for n in args.sizes:
            registry = f"bench/registry-{n}"
            init_registry(registry, base_model="bench/base", embedder="bench/embedder", embedder_dim=DIM,
                          endpoint=hub.url)
            vectors = clustered(n + 1, args.clusters, rng)
            start = time.perf_counter()
            written = write_rows(registry, synthetic_table(vectors[:n]), endpoint=hub.url)
            build = time.perf_counter() - start
            print(f"{n:>7} experts written and compacted in {build:.1f} s ({written.n_cells} cells)", flush=True)
            push = run_client(PUSH, [registry, proxy.url, json.dumps(vectors[n].tolist())],
                              Path(tmp) / f"home-push-{n}", proxy)
            target = int(rng.integers(0, n))
            query = unit(vectors[target][None] + rng.standard_normal((1, DIM)).astype(np.float32) / np.sqrt(DIM))[0]
            route = run_client(ROUTE, [registry, proxy.url, json.dumps(query.tolist())],
                               Path(tmp) / f"home-route-{n}", proxy)
            results.append({"experts": n, "cells": written.n_cells, "build_s": build, "push": push, "route": route})

    print()
    print("| experts | push s | push up | push down | push RSS | cold route s | route down | route RSS | index |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        p, q = r["push"], r["route"]
        print(f"| {r['experts']:,} | {p['seconds']:.2f} | {mb(p['up'])} | {mb(p['down'])} | {p['rss_mb']:.0f} MB | "
              f"{q['seconds']:.2f} | {mb(q['down'])} | {q['rss_mb']:.0f} MB | {q['index']} |")
    first, last = results[0], results[-1]
    ups = [r["push"]["up"] for r in results]
    targets = [
        (f"push at {last['experts']:,} <= 2x push at {first['experts']:,}",
         last["push"]["seconds"] <= 2 * first["push"]["seconds"],
         f"{last['push']['seconds']:.2f} s vs {first['push']['seconds']:.2f} s"),
        (f"cold route at {last['experts']:,} <= 2x at {first['experts']:,}",
         last["route"]["seconds"] <= 2 * first["route"]["seconds"],
         f"{last['route']['seconds']:.2f} s vs {first['route']['seconds']:.2f} s"),
        ("bytes uploaded per push independent of size (max <= 1.1x min)", max(ups) <= 1.1 * min(ups),
         " / ".join(mb(u) for u in ups)),
    ]
    print()
    for name, ok, detail in targets:
        print(f"{met(ok):>8}  {name}: {detail}")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "targets": [t[:2] for t in targets]}, indent=2))
    return exit_code(ok for _, ok, _ in targets)


if __name__ == "__main__":
    sys.exit(main())
