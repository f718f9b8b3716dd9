"""The `csc` command line."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import time

from csc.errors import CscError


def _add_spec_args(p: argparse.ArgumentParser, spec_help: str, optional: bool) -> None:
    p.add_argument("spec", nargs="?" if optional else None, help=spec_help)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec field, e.g. --set activations.layer=6 or --set "
                        "sweep.search.trainer.beta='{type: loguniform, low: 0.1, high: 5}' (values are YAML; a key "
                        "that holds dots goes in brackets: sweep.search[trainer.beta].high=5; repeatable)")


def cmd_activations(args: argparse.Namespace) -> None:
    from csc.activations.source import SPLITS, Activations
    from csc.config import ActivationsRunSpec
    from csc.spec_loader import load_spec
    from csc.sweep.spec import SweepSpec

    spec = load_spec(ActivationsRunSpec, args.spec, args.overrides, part_of=SweepSpec)
    acts = Activations(spec)
    a = spec.activations
    print(f"model {spec.model.name!r} layer {a.layer}, corpus {spec.corpus.source!r}, "
          f"context {a.context_length}, cache {a.cache_root}", flush=True)
    t0 = time.perf_counter()
    for split in SPLITS:
        acts.build(split)
    wall = time.perf_counter() - t0
    for split in SPLITS:
        n = acts.n_shards[split]
        print(f"{split:>5}: {n} shards, {n * a.contexts_per_shard * a.context_length:,} tokens in {acts.caches[split].dir}")
    if acts.lm_shards_computed:
        print(f"LM: {acts.lm_tokens:,} tokens in {acts.lm_seconds:.1f} s = {acts.lm_tokens / acts.lm_seconds:,.0f} tokens/s "
              f"(forward to layer {a.layer} only); wall {wall:.1f} s")
    else:
        print(f"all shards came from the cache (checksums verified) in {wall:.1f} s; the LM was not run")
    print(f"normalisation scale {acts.scale:.6g} (activations x scale have mean norm sqrt(d_model) = {acts.d_model ** 0.5:.1f})")


def cmd_train(args: argparse.Namespace) -> None:
    from pathlib import Path

    from csc.config import TrainRunSpec
    from csc.pipeline import dashboard
    from csc.pipeline.run import format_metrics, train_run
    from csc.spec_loader import load_spec
    from csc.sweep.spec import SweepSpec

    spec = load_spec(TrainRunSpec, args.spec, args.overrides, part_of=SweepSpec)
    out = Path(args.out)
    results = train_run(spec, out, resume=args.resume)
    print(format_metrics(results))
    print(f"SAE exported to {out / 'sae'} (SAELens layout); metrics in {out / 'eval.json'}; "
          f"feature dashboard in {out / dashboard.FILE}")


def cmd_eval(args: argparse.Namespace) -> None:
    from pathlib import Path

    from csc.pipeline.run import evaluate_saved, format_metrics
    from csc.sweep.saved import saved_saes

    saes = saved_saes(Path(args.path), args.best, args.spec, args.overrides)
    for i, saved in enumerate(saes, 1):
        if len(saes) > 1:
            print(f"\n== {saved.name} ({i} of {len(saes)})", flush=True)
        print(format_metrics(evaluate_saved(saved.spec, saved.sae_dir, saved.dashboard, saved.trained_on_spec)))
        print(f"feature dashboard written: {saved.dashboard}", flush=True)


def cmd_sweep(args: argparse.Namespace) -> None:
    from pathlib import Path

    from csc.spec_loader import load_spec
    from csc.sweep.run import dry_run, run_sweep, sweep_summary
    from csc.sweep.spec import SweepSpec, sweep_name

    spec = load_spec(SweepSpec, args.spec, args.overrides)
    if args.dry_run:
        print(dry_run(spec, sweep_name(spec, args.spec), Path(args.out), resume=args.resume, address=args.address))
        return
    result = run_sweep(spec, sweep_name(spec, args.spec), Path(args.out), resume=args.resume, verbose=args.verbose,
                       address=args.address)
    print("\n" + sweep_summary(result.sweep_dir))
    if result.interrupted:
        again = " ".join(["csc sweep", args.spec, *(f"--set {shlex.quote(o)}" for o in args.overrides), "--out", args.out,
                          *(["--address", args.address] if args.address else [])])
        print(f"the sweep was interrupted; continue it with: {again} --resume")


def cmd_report(args: argparse.Namespace) -> None:
    from pathlib import Path

    from csc.sweep.run import sweep_summary

    print(sweep_summary(Path(args.path)))


class _Stopped(Exception):
    def __init__(self, signum: int):
        self.signum = signum


def _raise_stopped(signum: int, frame: object) -> None:
    raise _Stopped(signum)


def cmd_ui(args: argparse.Namespace) -> int:
    from csc.sweep.ui import MlflowServer, check_store, default_tracking

    uri, root = default_tracking()
    uri = args.uri or uri
    check_store(uri)
    # The server runs in a session of its own (Ctrl+C in the terminal reaches only us): every way of stopping
    # `csc ui` must leave through the with-block, which ends the server's whole process group.
    previous = {sig: signal.signal(sig, _raise_stopped) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        with MlflowServer(uri, root, port=args.port) as server:
            print(f"MLflow UI for {uri} at {server.url}  (Ctrl+C stops it)", flush=True)
            code = server.wait()
            raise CscError(f"the MLflow server on {server.url} exited on its own with code {code}")
    except KeyboardInterrupt:
        signum = signal.SIGINT
    except _Stopped as e:
        signum = signal.Signals(e.signum)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"csc ui: {signum.name} received; the MLflow server on 127.0.0.1:{args.port} is stopped", file=sys.stderr)
    return 128 + signum


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="csc", description="Contrastive sparse autoencoders on LM activations.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("activations", help="build the activation cache of a spec (train and held-out splits)")
    _add_spec_args(p, "YAML spec file, e.g. sweeps/quickstart.yaml (its other sections are checked and ignored; "
                      "default: built-in defaults, the embedded model and corpus)", optional=True)
    p.set_defaults(func=cmd_activations)
    p = sub.add_parser("train", help="train one SAE, evaluate it on held-out text and export it")
    _add_spec_args(p, "YAML spec file, e.g. sweeps/quickstart.yaml (its sweep section is checked and ignored); "
                      "without one, every field has its default but sae.dict_size and trainer.steps, which --set "
                      "must give", optional=True)
    p.add_argument("--out", default="runs/train", help="run folder (default: runs/train)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("eval", help="measure exported SAEs again on their held-out data and rewrite their feature "
                                    "dashboards")
    p.add_argument("path", help="a run folder of `csc train` (or its sae/ subfolder), a sweep folder (its finished "
                                "trials), one of its trial folders, or any SAE folder in SAELens's layout (cfg.json "
                                "and sae_weights.safetensors, e.g. written by SAELens's save_model)")
    p.add_argument("--best", type=int, metavar="N", help="of a sweep folder, only the best N finished trials by the "
                                                         "sweep's objectives (with several, the Pareto set's first N)")
    p.add_argument("--spec", help="of a SAELens folder: the YAML spec whose model, corpus, activations and eval "
                                  "sections it is measured with (default: built-in defaults; model.name and "
                                  "activations.layer come from cfg.json's model_name and hook_name unless given). "
                                  "SAEs csc trained are measured with the spec they were trained on")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the spec the SAEs are measured with, e.g. --set eval.ce_contexts=64 "
                        "(repeatable)")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("sweep", help="run a Ray Tune sweep of SAEs sharing one activation producer, tracked in MLflow")
    _add_spec_args(p, "YAML sweep spec, e.g. sweeps/quickstart.yaml", optional=False)
    p.add_argument("--out", default="runs/sweeps", help="folder of sweep folders (default: runs/sweeps)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep of the same name")
    p.add_argument("--verbose", type=int, default=1, choices=[0, 1, 2], help="Tune's progress output (default: 1)")
    p.add_argument("--dry-run", action="store_true", help="make every check the sweep makes before it starts, print "
                                                          "what it would run, and stop (starts nothing, writes nothing)")
    p.add_argument("--address", help="join this Ray cluster (HOST:PORT of its head, or 'auto'; default: "
                                     "$RAY_ADDRESS, else a local Ray); --out must then be storage every node sees")
    p.set_defaults(func=cmd_sweep)
    p = sub.add_parser("report", help="reprint the summary and best trials of a sweep folder")
    p.add_argument("path", help="sweep folder written by `csc sweep` (e.g. runs/sweeps/quickstart)")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1 for the sweeps' tracking store")
    p.add_argument("--uri", help="tracking URI (default: sqlite:///mlflow.db in the working directory, which must "
                                 "exist: `csc sweep` writes it)")
    p.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 (default: 5000)")
    p.set_defaults(func=cmd_ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except CscError as e:
        print(f"csc: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("csc: interrupted; finished shards are kept in the cache", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
