"""Reliability in numbers, in one run against a fresh local Hub (tiny random Llama, real MiniLM embedder).

- races: N pusher processes (N = 2, 8, 32) push N different experts into one registry at once;
  acknowledged = pushers that exited 0, in index = rows afterwards, lost = acknowledged but not in the index;
- faults: every transient fault kind x every request a push makes (and the pull download), each striking
  twice; survived = the operation completed and the registry verifies clean; plus persistent faults, where
  "survived" means a clear HubUnavailableError, no row written, and a successful rerun once the fault clears;
- bad inputs: random registry rows, repo ids, queries and raw HTTP requests; crashes = an exception other
  than the documented error, or a 5xx from the Hub.

Prints one table with a target per row, met / NOT met computed from the figures (lost, failed, verify
problems and crashes 0; every fault survived; the Hub unchanged by bad inputs); exit code 1 if one is missed.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import string
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("MOIN_HUB_ATTEMPTS", "3")


def main() -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from _common import exit_code, met
    from huggingface_hub import HfApi, constants

    from moin_hub import LocalHub, Registry, init_registry, pull, push_expert
    from moin_hub._validators import validate_query, validate_repo_id
    from moin_hub.errors import EmptyQueryError, HubUnavailableError, InvalidRegistryError
    from moin_hub.hub.registry import experts_from_parquet
    from tests import _helpers
    from tests.reliability._tools import consistency_problems, race_pushes, raw_request, subprocess_env
    from tests.reliability.test_faults import TRANSIENT, targets

    root = Path(tempfile.mkdtemp(prefix="moin-rel-"))
    os.environ["HF_HOME"] = str(root / "hf_home")
    constants.HF_HUB_CACHE = str(root / "hf_home" / "hub")
    rows: list[tuple[str, str, str, bool]] = []  # (what, result, target, met)
    hub = LocalHub(root / "hub").start()
    try:
        api = HfApi(endpoint=hub.url)
        base = _helpers.make_tiny_llama(root / "tiny")
        _helpers.upload_folder(api, base, "bench/tiny-llama")
        _helpers.upload_folder(api, _helpers.embedder_dir(), "bench/minilm")
        embedder = _helpers.load_local_embedder()

        def experts(n: int, tag: str) -> list[Path]:
            return [_helpers.write_expert(root / tag / f"e{i}", base, embedder, "cooking", base_repo="bench/tiny-llama",
                                          expert_id=f"e{i}", seed=i) for i in range(n)]

        def registry(name: str) -> str:
            init_registry(f"bench/{name}", base_model="bench/tiny-llama", embedder="bench/minilm", endpoint=hub.url)
            return f"bench/{name}"

        # -- races
        for n in (2, 8, 32):
            reg = registry(f"race-{n}")
            start = time.perf_counter()
            acked, failed = race_pushes(experts(n, f"race{n}"), reg, [f"bench/r{n}-{i}" for i in range(n)],
                                        subprocess_env(hub.url, root / f"home{n}"))
            seconds = time.perf_counter() - start
            index = {r.expert_id for r in Registry.load(reg, endpoint=hub.url)}
            lost = [a["expert_id"] for a in acked if a["expert_id"] not in index]
            problems = consistency_problems(reg, hub.url, root)
            rows.append((f"race: {n} pushers", f"acknowledged {len(acked)}, in index {len(index)}, lost {len(lost)}, "
                                               f"failed {len(failed)}, verify problems {len(problems)} ({seconds:.1f} s)",
                         f"all {n} in index, 0 lost/failed/problems",
                         len(acked) == n and len(index) == n and not lost and not failed and not problems))

        # -- faults
        folder = experts(1, "faults")[0]
        survived = total = 0
        for target in ("expert-commit", "expert-preupload", "registry-read", "registry-commit"):
            for name, (kind, options) in sorted(TRANSIENT.items()):
                reg = registry(f"f-{target}-{name}")
                repo = f"bench/f-{target}-{name}"
                hub.inject_fault(*targets(reg, repo)[target], kind, times=2, **options)
                total += 1
                try:
                    push_expert(folder, registry=reg, repo_id=repo, endpoint=hub.url)
                    survived += int(not consistency_problems(reg, hub.url, root) and len(Registry.load(
                        reg, endpoint=hub.url)) == 1)
                except Exception as err:  # noqa: BLE001 - counted, reported
                    print(f"  push under {name} on {target} failed: {type(err).__name__}: {err}", file=sys.stderr)
                hub.clear_faults()
        rows.append(("faults: transient x push", f"{survived}/{total} pushes completed and verified "
                                                 f"({len(TRANSIENT)} kinds x 4 requests, each striking twice)",
                     f"{total}/{total}", survived == total))
        pulled = 0
        for name, (kind, options) in sorted(TRANSIENT.items()):
            hub.inject_fault("GET", r"/resolve/[0-9a-f]{40}/adapter_model", kind, times=2, **options)
            try:
                pull(expert="e0", registry=reg, endpoint=hub.url, local_dir=root / f"pull-{name}")
                pulled += 1
            except Exception as err:  # noqa: BLE001
                print(f"  pull under {name} failed: {type(err).__name__}: {err}", file=sys.stderr)
            hub.clear_faults()
        rows.append(("faults: transient x pull", f"{pulled}/{len(TRANSIENT)} pulls completed",
                     f"{len(TRANSIENT)}/{len(TRANSIENT)}", pulled == len(TRANSIENT)))
        clean = 0
        for name in ("503", "drop"):
            for target in ("expert-commit", "registry-commit"):
                reg = registry(f"p-{target}-{name}")
                repo = f"bench/p-{target}-{name}"
                kind, options = TRANSIENT[name]
                before = Registry.load(reg, endpoint=hub.url).revision
                hub.inject_fault(*targets(reg, repo)[target], kind, times=None, **options)
                try:
                    push_expert(folder, registry=reg, repo_id=repo, endpoint=hub.url)
                    ok = False
                except HubUnavailableError:
                    hub.clear_faults()
                    ok = Registry.load(reg, endpoint=hub.url).revision == before
                    push_expert(folder, registry=reg, repo_id=repo, endpoint=hub.url)
                    ok = ok and not consistency_problems(reg, hub.url, root)
                hub.clear_faults()
                clean += int(ok)
        rows.append(("faults: persistent x push", f"{clean}/4 failed clearly, wrote nothing, and completed on rerun",
                     "4/4", clean == 4))

        # -- bad inputs
        rng = random.Random(0)
        tried = crashes = 0

        def junk(n: int) -> str:
            return "".join(rng.choice(string.printable + "\x00\u202e😀é") for _ in range(rng.randint(0, n)))

        for _ in range(300):  # registry rows
            tried += 1
            row = {"expert_id": junk(12), "repo_id": rng.choice(["org/e", junk(20)]),
                   "revision": rng.choice(["a" * 40, junk(40)]),
                   "centroid": [rng.choice([0.5, float("nan"), float("inf"), -1.0]) for _ in range(rng.randint(0, 6))]}
            if rng.random() < 0.3:
                row.pop(rng.choice(list(row)))
            buffer = io.BytesIO()
            pq.write_table(pa.Table.from_pylist([row]), buffer)
            try:
                experts_from_parquet(buffer.getvalue(), registry_id="org/reg", dim=4)
            except InvalidRegistryError:
                pass
            except Exception:  # noqa: BLE001
                crashes += 1
        for _ in range(300):  # repo ids and queries
            tried += 2
            for check, allowed in ((validate_repo_id, ValueError), (validate_query, (EmptyQueryError, ValueError))):
                try:
                    check(junk(120))
                except allowed:
                    pass
                except Exception:  # noqa: BLE001
                    crashes += 1
        before = sorted(m.id for m in api.list_models())
        paths = ["/api/repos/create", "/api/models/bench/r2-0/commit/main", "/api/validate-yaml",
                 "/bench/r2-0/resolve/main/..%2F..%2Fetc", "/api/models/bench/r2-0/preupload/main"]
        url_safe = string.ascii_letters + string.digits + "-._~%/:@!$&'()*+,;="
        for _ in range(300):  # raw HTTP
            tried += 1
            method = rng.choice(["GET", "POST", "PUT", "DELETE"])
            path = rng.choice(paths + ["/" + "".join(rng.choice(url_safe) for _ in range(rng.randint(0, 40)))])
            body = junk(200).encode(errors="replace") if method != "GET" else None
            try:
                if raw_request(hub.url, method, path, body)[0] >= 500:
                    crashes += 1
            except OSError:
                crashes += 1
        changed = sorted(m.id for m in api.list_models()) != before
        rows.append(("bad inputs", f"{tried} tried, crashes {crashes}, Hub state changed by them: {changed}",
                     "0 crashes, unchanged", crashes == 0 and not changed))
    finally:
        hub.stop()
        shutil.rmtree(root, ignore_errors=True)

    width = max(len(name) for name, *_ in rows)
    print(f"{'reliability':<{width}}  result  [target: met / NOT met]")
    for name, value, target, ok in rows:
        print(f"{name:<{width}}  {value}  [{target}: {met(ok)}]")
    return exit_code(ok for *_, ok in rows)


if __name__ == "__main__":
    sys.exit(main())
