"""`fluxlab cache build|stats|verify`: fill the latent / text-embedding / position-id caches for a
training config, print their sizes and counters, check every entry and evict corrupt ones."""

from __future__ import annotations

import json
import time
from pathlib import Path

from fluxlab.commands import parse_pairs


def add(sub) -> None:
    p = sub.add_parser("cache", help="latent / text-embedding / position-id caches")
    s = p.add_subparsers(dest="cache_cmd", required=True)
    b = s.add_parser("build", help="fill the caches for a training config")
    b.add_argument("config")
    b.add_argument("--set", action="append", dest="overrides", metavar="KEY=VALUE")
    b.add_argument("--json", action="store_true")
    st = s.add_parser("stats", help="print cache sizes and counters")
    ve = s.add_parser("verify", help="check every entry; evict corrupt ones")
    for q in (st, ve):
        q.add_argument("cache_dir", nargs="?", default=None,
                       help="the cache folder (default: the one `train` uses, $FLUXLAB_HOME/cache)")
    for q in (b, st, ve):
        q.set_defaults(func=run)


def run(a) -> int:
    from fluxlab.config import default_cache_dir

    if a.cache_cmd == "build":
        return cli_build(a.config, parse_pairs(a.overrides), as_json=a.json)
    cache_dir = a.cache_dir if a.cache_dir is not None else str(default_cache_dir())
    return cli_stats(cache_dir) if a.cache_cmd == "stats" else cli_verify(cache_dir)


def cli_build(config_path: str, overrides: dict[str, str], as_json: bool = False) -> int:
    from fluxlab._atomic import atomic_write_bytes
    from fluxlab.config import load_config
    from fluxlab.training.loader import build_caches

    cfg = load_config(config_path, overrides)
    counts = build_caches(cfg)
    Path(cfg.cache_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(Path(cfg.cache_dir) / "last_build.json",
                       json.dumps({"utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                   "config": str(config_path), "overrides": overrides,
                                   "counts": counts}, indent=1).encode())
    if not as_json:
        for name, c in counts.items():
            print(f"{name:9s} hits {c['hits']:6d}  misses {c['misses']:6d}  bytes {c['bytes']:12d}")
        print(f"caches in {cfg.cache_dir}")
    else:
        print(json.dumps(counts))  # the last line is the machine-readable result
    return 0


def cli_stats(cache_dir: str) -> int:
    from fluxlab import caches
    from fluxlab.errors import UserFileNotFound

    path = Path(cache_dir)
    if not path.is_dir():
        raise UserFileNotFound(f"{path}: no such cache directory; run `fluxlab cache build CONFIG` first")
    for kind, u in caches.disk_usage(path).items():
        print(f"{kind:9s} entries {u['entries']:6d}  bytes on disk {u['bytes']:12d}")
    last = path / "last_build.json"
    if last.exists():
        rec = json.loads(last.read_text())
        print(f"last build {rec['utc']} ({rec['config']}):")
        for name, c in rec["counts"].items():
            print(f"  {name:9s} hits {c['hits']:6d}  misses {c['misses']:6d}  bytes {c['bytes']:12d}")
    return 0


def cli_verify(cache_dir: str) -> int:
    """Exit 0 when every entry is sound, 1 when corrupt entries were found (they are evicted)."""
    from fluxlab import caches

    res = caches.verify_cache(cache_dir)
    for line in res["corrupt"]:
        print(f"corrupt, evicted: {line}")
    print(f"checked {res['checked']} entries, {len(res['corrupt'])} corrupt, {res['evicted']} evicted")
    return 1 if res["corrupt"] else 0
