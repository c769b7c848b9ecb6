"""`fluxlab` command line: parses arguments and calls the modules. No logic lives here.

Each command group has its own `_add_<group>` function; the handler imports its module
lazily so `fluxlab doctor` does not pay for importing diffusers.
"""

from __future__ import annotations

import argparse
import os
import sys

from fluxlab.errors import UserError  # noqa: F401  (historical home: fluxlab.cli.UserError)


def parse_pairs(values: list[str] | None) -> dict[str, str]:
    """Parse repeated `--set key=value` / `-p key=value` into a dict, refusing malformed pairs."""
    out: dict[str, str] = {}
    for item in values or []:
        if "=" not in item:
            raise UserError(f"expected key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = value
    return out


# --- doctor -----------------------------------------------------------------
def _add_doctor(sub) -> None:
    p = sub.add_parser("doctor", help="print versions, device and Triton mode")
    p.set_defaults(func=lambda a: __import__("fluxlab.env", fromlist=["x"]).doctor())


# --- tiny -------------------------------------------------------------------
def _add_tiny(sub) -> None:
    p = sub.add_parser("tiny", help="the offline tiny FLUX pipeline")
    s = p.add_subparsers(dest="tiny_cmd", required=True)
    b = s.add_parser("build", help="build a tiny FluxPipeline and save it with save_pretrained")
    b.add_argument("dir")
    b.add_argument("--seed", type=int, default=0)

    def run(a):
        from fluxlab import models

        path = models.build_tiny_pipeline(a.dir, seed=a.seed)
        print(f"tiny FLUX pipeline written to {path}")
        return 0

    b.set_defaults(func=run)


# --- generate ---------------------------------------------------------------
def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate one image with a pipeline (tiny by default)")
    p.add_argument("--model", default="tiny", help="a preset name or a diffusers FLUX directory")
    p.add_argument("--prompt", default="a red circle on a white background")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--max-sequence-length", type=int, default=512, help="T5 tokens of the prompt (1..512)")
    p.add_argument("--lora", default=None, metavar="PATH",
                   help="a LoRA .safetensors file or a training output_dir (loaded with load_lora_weights)")
    p.add_argument("--lora-scale", type=float, default=1.0, metavar="S",
                   help="multiplies the LoRA's trained strength (1: as trained, 0: the base model)")
    p.add_argument("--out", default="runs/generate.png")

    def run(a):
        import io

        from fluxlab._atomic import atomic_write_bytes
        from fluxlab.inference import InferenceSession, to_pil

        if a.lora_scale != 1.0 and not a.lora:
            raise UserError("--lora-scale needs --lora PATH (the LoRA to scale)")
        session = InferenceSession(a.model, a.device, steps=a.steps, size=a.size,
                                   max_sequence_length=a.max_sequence_length, lora=a.lora, lora_scale=a.lora_scale)
        image, _ = session.generate(a.prompt, a.seed)  # [3, size, size] in [0, 1]
        buf = io.BytesIO()
        to_pil(image).save(buf, format="PNG")
        path = atomic_write_bytes(a.out, buf.getvalue())
        print(f"image written to {path}" + (f" (LoRA {session.lora} at scale {a.lora_scale:g})" if a.lora else ""))
        return 0

    p.set_defaults(func=run)


# --- data -------------------------------------------------------------------
def _add_data(sub) -> None:
    p = sub.add_parser("data", help="sample data, synthetic shapes, dataset validation")
    s = p.add_subparsers(dest="data_cmd", required=True)
    a = s.add_parser("sample", help="copy captioned photos from scikit-image into DIR")
    a.add_argument("dir")
    b = s.add_parser("shapes", help="generate a deterministic coloured-shapes dataset")
    b.add_argument("dir")
    b.add_argument("--n", type=int, default=64)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--size", type=int, default=64)
    b.add_argument("--aspect-every", type=int, default=0, metavar="K",
                   help="make every K-th image 2:3 or 3:2 to exercise aspect buckets (0: all square)")
    v = s.add_parser("validate", help="check image/caption pairs and report statistics")
    v.add_argument("dir")
    v.add_argument("--json", action="store_true", help="print the report as JSON")

    def run(args):
        from fluxlab import data

        return data.cli(args)

    for q in (a, b, v):
        q.set_defaults(func=run)


# --- train / lr-find --------------------------------------------------------
def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a LoRA from a YAML config")
    p.add_argument("config")
    p.add_argument("--set", action="append", dest="overrides", metavar="KEY=VALUE")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint directory")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in an output_dir that holds an earlier one: the old run is moved "
                        "aside to <output_dir>.replaced-<time>, never deleted")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="write a torch.profiler trace of N steps after warm-up")

    def run(a):
        from fluxlab import trainer

        return trainer.cli_train(a.config, parse_pairs(a.overrides), resume=a.resume, profile=a.profile,
                                 overwrite=a.overwrite)

    p.set_defaults(func=run)

    f = sub.add_parser("lr-find", help="learning-rate range test")
    f.add_argument("config")
    f.add_argument("--set", action="append", dest="overrides", metavar="KEY=VALUE")

    def run_lr(a):
        from fluxlab import trainer

        return trainer.cli_lr_find(a.config, parse_pairs(a.overrides))

    f.set_defaults(func=run_lr)


# --- cache ------------------------------------------------------------------
def _add_cache(sub) -> None:
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

    def run(a):
        from fluxlab import caches

        if a.cache_cmd != "build" and a.cache_dir is None:
            from fluxlab.config import default_cache_dir

            a.cache_dir = str(default_cache_dir())
        if a.cache_cmd == "build":
            return caches.cli_build(a.config, parse_pairs(a.overrides), as_json=a.json)
        if a.cache_cmd == "stats":
            return caches.cli_stats(a.cache_dir)
        return caches.cli_verify(a.cache_dir)

    for q in (b, st, ve):
        q.set_defaults(func=run)


# --- results ----------------------------------------------------------------
def _add_results(sub) -> None:
    p = sub.add_parser("results", help="the results store")
    p.add_argument("--store", default=None, help="path of the SQLite store (default: $FLUXLAB_STORE or results/fluxlab.db)")
    s = p.add_subparsers(dest="results_cmd", required=True)
    s.add_parser("list", help="one line per record")
    e = s.add_parser("export", help="export records")
    g = e.add_mutually_exclusive_group(required=True)
    g.add_argument("--json", action="store_true", help="JSON lines")
    g.add_argument("--csv", action="store_true")
    e.add_argument("--out", default="-")
    i = s.add_parser("import", help="load *.jsonl records (e.g. benchmarks/results/)")
    i.add_argument("path")
    h = s.add_parser("harvest", help="rebuild records from executed notebooks under a runs/ folder")
    h.add_argument("path", nargs="?", default="runs")

    def run(a):
        from fluxlab import store

        if a.results_cmd == "list":
            return _results_list(a.store)
        return store.cli(a)

    for q in (p,):
        q.set_defaults(func=run)


def _results_list(store_path) -> int:
    """`fluxlab results list`: one row per record under a header; a record without a verdict is a
    plain measurement (no comparison), shown as `measured`."""
    from fluxlab import store

    try:
        recs = store.query(store_path)
    except store.StoreError as e:
        print(f"fluxlab: error: {e}", file=sys.stderr)
        return 2
    if not recs:
        print(f"no records in {store_path or store.default_store_path()}")
        return 0
    head = ("utc", "benchmark", "device", "verdict", "ratio", "95% CI", "id")
    rows = [(str(r.get("utc") or "?")[:19], str(r["benchmark"]), str(r.get("device_name") or r.get("device") or "-"),
             "measured" if r.get("verdict") is None else str(r["verdict"]),
             "-" if r.get("ratio") is None else f"{r['ratio']:.3f}",
             "-" if r.get("ci_low") is None else f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]", r["id"][:8])
            for r in recs]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    for r in (head, tuple("-" * w for w in widths), *rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


# --- notebook ---------------------------------------------------------------
def _add_notebook(sub) -> None:
    p = sub.add_parser("notebook", help="run parameterized notebooks through papermill")
    s = p.add_subparsers(dest="nb_cmd", required=True)
    r = s.add_parser("run", help="run one notebook")
    r.add_argument("name")
    r.add_argument("--preset", default="ci", choices=["ci", "full"])
    r.add_argument("-p", action="append", dest="params", metavar="KEY=VALUE")
    a = s.add_parser("run-all", help="run every notebook and print the verdict table")
    a.add_argument("--preset", default="ci", choices=["ci", "full"])
    w = s.add_parser("sweep", help="run a parameter grid")
    w.add_argument("name")
    w.add_argument("--preset", default="ci", choices=["ci", "full"])
    w.add_argument("-p", action="append", dest="params", metavar="KEY=V1,V2")
    w.add_argument("--workers", type=int, default=1)
    w.add_argument("--force", action="store_true")

    for q in (r, a, w):
        q.add_argument("--runs-dir", default="runs", help="where executed notebooks are written (default: runs)")
        q.add_argument("--timeout", type=float, default=None, help="seconds one cell may run (default: no limit)")

    def run(args):
        from fluxlab import notebook

        try:
            return notebook.cli(args)
        except notebook.ParameterError as e:  # a bad -p value or notebook name: the user's to fix
            raise UserError(str(e)) from None

    for q in (r, a, w):
        q.set_defaults(func=run)


# --- bench ------------------------------------------------------------------
def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="GPU benchmarks (train step, inference, kernels)")
    p.add_argument("what", choices=["train", "infer", "kernels", "caches"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options passed to the benchmark script")

    def run(a):
        import runpy
        from pathlib import Path

        script = Path(__file__).resolve().parent.parent / "benchmarks" / f"{a.what}.py"
        if not script.exists():
            raise UserError(f"{script} not found: `fluxlab bench` runs from a source checkout")
        sys.argv = [str(script), *a.rest]
        runpy.run_path(str(script), run_name="__main__")
        return 0

    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fluxlab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for add in (_add_doctor, _add_tiny, _add_generate, _add_data, _add_train, _add_cache,
                _add_results, _add_notebook, _add_bench):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc = args.func(args)
    except BrokenPipeError:
        # `fluxlab results list | head`: the reader left early, which is not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        # Ctrl-C outside the trainer's own handling (imports, start-up): no traceback; 128 + SIGINT.
        print("fluxlab: interrupted", file=sys.stderr)
        return 130
    except (UserError, FileNotFoundError) as e:
        # User-fixable problems (and paths the user gave that do not exist): one clear line, no
        # traceback. Anything else is a fluxlab bug and keeps its traceback.
        print(f"fluxlab: error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
