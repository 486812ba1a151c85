"""`rlvr`: the project's command line (run it from the project root, where dvc.yaml is).

  rlvr services up|down|status   local Prefect and MLflow servers on 127.0.0.1
  rlvr run [DVC REPRO ARGS]      the pipeline (dvc repro), reporting to the services when they are up
  rlvr retrain                   one retrain: dvc repro, register, promote only a better model
  rlvr schedule                  serve the retrain flow on the cron schedule in params (needs services)
  rlvr lineage [--version N]     a registered version's chain back to the source files
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from flows import configure_environment, services


def _root() -> Path:
    root = Path.cwd()
    if not (root / "dvc.yaml").is_file() or not (root / "params.yaml").is_file():
        raise SystemExit(f"rlvr: run this from the project root (no dvc.yaml / params.yaml in {root})")
    return root


def _use_services(root: Path) -> dict[str, str]:
    """Point Prefect and MLflow at the running services (values already in the environment win)."""
    env = services.environment(root)
    for key, value in env.items():
        os.environ.setdefault(key, value)
    return env


def cmd_services(args) -> int:
    root = _root()
    if args.action == "up":
        running = services.up(root, prefect_port=args.prefect_port, mlflow_port=args.mlflow_port)
        for s in running.values():
            print(f"{s.name:8} {s.url}  (pid {s.pid}, log {s.log})")
        print(f"\nexport PREFECT_API_URL={running['prefect'].url}/api MLFLOW_TRACKING_URI={running['mlflow'].url}"
              "\n(rlvr run / retrain / schedule / lineage pick these up by themselves)")
    elif args.action == "down":
        stopped = services.down(root)
        print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
    else:
        print(json.dumps(services.status(root), indent=2))
    return 0


def cmd_run(args) -> int:
    root = _root()
    _use_services(root)
    dvc = Path(sys.executable).parent / "dvc"
    return subprocess.call([str(dvc) if dvc.exists() else "dvc", "repro", *args.dvc_args], cwd=root, env=services.dvc_env())


def cmd_retrain(args) -> int:
    _use_services(_root())
    from flows import info_logging
    from flows.retrain import retrain

    info_logging()
    summary = retrain(params_file=args.params)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_schedule(args) -> int:
    root = _root()
    _use_services(root)
    if not os.environ.get("PREFECT_API_URL"):
        raise SystemExit("rlvr schedule needs a Prefect server: run `rlvr services up` first "
                         "(Prefect's temporary server cannot hold schedules)")
    from flows import info_logging
    from flows.retrain import retrain
    from rlvr import config

    info_logging()
    params = config.load(args.params)
    print(f"serving retrain as deployment 'retrain/{params.retrain.deployment}' on cron "
          f"'{params.retrain.cron}' against {os.environ['PREFECT_API_URL']} (Ctrl-C stops)", flush=True)
    retrain.serve(name=params.retrain.deployment, cron=params.retrain.cron,
                  parameters={"params_file": args.params}, print_starting_message=False)
    return 0


def cmd_lineage(args) -> int:
    root = _root()
    _use_services(root)
    import mlflow
    from mlflow import MlflowClient

    from rlvr import config, registry, tracking

    params = config.load(args.params)
    mlflow.set_tracking_uri(tracking.tracking_uri(params))
    client = MlflowClient()
    name = args.name or params.retrain.registered_model
    version = args.version
    if version is None:
        champion = registry.champion_version(client, name)
        if champion is None:
            raise SystemExit(f"rlvr lineage: {name} has no champion; pass --version N (rlvr retrain registers one)")
        version = champion.version
    record = registry.lineage(client, name, str(version), root / "dvc.lock")
    print(registry.render(record))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlvr", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("services", help="start, stop or show the local Prefect and MLflow servers")
    p.add_argument("action", choices=("up", "down", "status"))
    p.add_argument("--prefect-port", type=int, default=4200)
    p.add_argument("--mlflow-port", type=int, default=5000)
    p.set_defaults(func=cmd_services)
    p = sub.add_parser("run", help="run the pipeline (dvc repro); extra arguments go to dvc repro")
    p.add_argument("dvc_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_run)
    for name, func, text in (("retrain", cmd_retrain, "retrain once: dvc repro, register, promote if better"),
                             ("schedule", cmd_schedule, "serve the retrain flow on the cron schedule in params")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--params", default="params.yaml")
        p.set_defaults(func=func)
    p = sub.add_parser("lineage", help="print a registered model version's lineage")
    p.add_argument("--name", help="registered model (default: retrain.registered_model)")
    p.add_argument("--version", help="version number (default: the champion)")
    p.add_argument("--params", default="params.yaml")
    p.set_defaults(func=cmd_lineage)
    return parser


def main(argv: list[str] | None = None) -> int:
    configure_environment()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except services.ServiceError as error:
        print(f"rlvr: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
