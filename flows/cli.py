"""`rlvr`: the project's command line (run it from the project root, where dvc.yaml is).

  rlvr services up|down|status   local Prefect and MLflow servers on 127.0.0.1 (MLflow on SQLite or PostgreSQL);
                                 up --vllm: also the vLLM server of train.vllm_mode: server
  rlvr doctor                    check this machine: Python, packages, PostgreSQL, ports, DVC remote, GPU, vLLM
  rlvr remote add URL            make URL (a folder, s3://, gs://, ssh://...) the project's default DVC remote
  rlvr check                     validate params.yaml and the input paths it names (runs nothing)
  rlvr run [DVC REPRO ARGS]      rlvr check, then the pipeline (dvc repro), reporting to the services when up
  rlvr retrain                   one retrain: dvc repro, register, promote only a better model
  rlvr schedule [--serve]        deploy retrain (prefect.yaml, cron from params) and start a worker (needs services)
  rlvr lineage [--version N]     a registered version's chain back to the source files
  rlvr grid --name G -S k=a,b    queue and run a grid of DVC experiments (variants x seeds)
  rlvr compare --grid G --baseline k=a   seed-aware comparison report of a grid (markdown, PNG, MLflow)
  rlvr recipe NAME --dry-run|--exp|--apply   a configs/recipes/ preset: show it, run it as a DVC experiment, or apply it
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from flows import configure_environment, services
from rlvr import config
from rlvr.errors import RlvrError, debug_enabled, report


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


def _wants_vllm_server(root: Path) -> bool:
    """Whether params.yaml trains with a vLLM server (False when it does not load: `up` needs no params)."""
    try:
        train = config.load(root / "params.yaml").train
    except config.ConfigError:
        return False
    return train.use_vllm and train.vllm_mode == "server"


def _services_params(root: Path, recipe_name: str | None) -> config.Params:
    """params.yaml, or params.yaml with a recipe applied (as `rlvr recipe NAME --exp` will run it)."""
    if not recipe_name:
        return config.load(root / "params.yaml")
    from flows import recipe

    data, _ = recipe.resolve(recipe.load(recipe_name, root), root / "params.yaml")
    return config.from_dict(data)


def cmd_services(args) -> int:
    root = _root()
    if args.action == "up":
        vllm_plan = None
        if args.recipe and not args.vllm:
            raise SystemExit("rlvr services: --recipe names the params of the vLLM server; use it with --vllm")
        if args.vllm:
            params = _services_params(root, args.recipe)
            # checked before anything starts: a missing vLLM or a wrong mode is one line, not half the servers
            vllm_plan = services.plan_vllm(root, params, args.vllm_gpus, args.vllm_tensor_parallel)
        running = services.up(root, prefect_port=args.prefect_port, mlflow_port=args.mlflow_port, auth=args.auth,
                              backend=args.backend or services.default_backend(), postgres_port=args.postgres_port,
                              artifacts=args.artifacts)
        for s in running.values():
            print(f"{s.name:8} {s.url}  (pid {s.pid}, log {s.log}{', login required' if s.auth else ''})")
        mlflow = running["mlflow"]
        print(f"\nMLflow store: {mlflow.backend or 'mlruns/mlflow.db'}"
              + (f"; artifacts: {mlflow.artifacts}" if mlflow.artifacts else ""))
        try:
            experiment = config.load(root / "params.yaml").tracking.experiment
        except RlvrError:  # params.yaml is broken: the servers still run; `rlvr check` says what is wrong
            experiment = None
        pages = services.ui_pages(running["prefect"].url, mlflow.url, experiment,
                                  services.credentials() if args.auth else None)
        print()
        for name, url in pages.items():
            print(f"{name + ':':18} {url}")
        print(f"\nexport PREFECT_API_URL={running['prefect'].url}/api MLFLOW_TRACKING_URI={running['mlflow'].url}")
        if args.auth:
            user, password = f"${services.USER_ENV}", f"${services.PASSWORD_ENV}"
            print(f"export PREFECT_API_AUTH_STRING={user}:{password} MLFLOW_TRACKING_USERNAME={user} "
                  f"MLFLOW_TRACKING_PASSWORD={password}")
        print("(rlvr run / retrain / schedule / lineage pick these up by themselves)")
        if vllm_plan:
            print(f"\nstarting the vLLM server for {vllm_plan[0]} (log {services.LOGS / 'vllm.log'}; loading can take "
                  "minutes) ...", flush=True)
            vllm = services.start_vllm(root, params, args.vllm_gpus, args.vllm_tensor_parallel)
            print(f"{vllm.name:8} {vllm.url}  (pid {vllm.pid}, model {vllm.model}, {vllm.backend}, log {vllm.log})")
        elif _wants_vllm_server(root) and "vllm" not in services.running(root):
            print("\nparams.yaml has train.vllm_mode: server; `rlvr services up --vllm --vllm-gpus IDS` starts that "
                  "vLLM server")
    elif args.action == "down":
        outcome = services.down(root)
        for name, text in outcome.items():
            print(f"{name:8} {text}")
        if not outcome:
            print(f"nothing to stop: no servers recorded in {services.STATE}")
    else:
        report = services.status(root)
        if args.json:
            print(json.dumps(report, indent=2))
        for name, entry in report.items() if not args.json else ():
            health = "healthy" if entry["healthy"] else ("not answering" if entry["is_server"] else "not running")
            print(f"{name:8} {health:13} {entry['url']}  pid {entry['pid']}  backend {entry['backend']}"
                  + (f"  artifacts {entry['artifacts']}" if "artifacts" in entry else "")
                  + (f"  pool {entry['pool']}" if "pool" in entry else "")
                  + (f"  model {entry['model']}" if "model" in entry else "")
                  + (f"\n         {entry['problem']}" if "problem" in entry else ""))
        if not report:
            print(f"no servers recorded in {services.STATE}: `rlvr services up` starts them")
        # The sweep imports MLflow and Prefect and asks both servers (tens of seconds on a busy machine):
        # the status above is printed first.
        sys.stdout.flush()
        try:
            _use_services(root)
            swept = services.sweep_zombies(root)
        except (services.ServiceError, RlvrError) as error:  # missing credentials, params.yaml broken
            swept = [f"runs of stopped stages not swept: {error}"]
        for line in swept:  # on stderr with --json, so that stdout stays one JSON document
            print(f"swept    {line}", file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_doctor(args) -> int:
    from flows import doctor

    checks = doctor.run(Path.cwd(), {"prefect": args.prefect_port, "mlflow": args.mlflow_port})
    print(doctor.render(checks))
    return doctor.exit_code(checks)


def cmd_remote(args) -> int:
    from flows import remote

    root = _root()
    try:
        name = remote.add(root, args.url, args.name)
    except remote.RemoteError as error:
        raise SystemExit(f"rlvr remote: {error}") from None
    print(f"default DVC remote: {name} -> {args.url} (in .dvc/config; commit it to share it)")
    extra = remote.missing_extra(args.url)
    if extra:
        print(f"this remote needs DVC's plugin: pip install '{extra}'")
    print("credentials go to .dvc/config.local (`dvc remote modify --local ...`) or the environment, never "
          ".dvc/config; `dvc push` uploads, and `rlvr retrain` pushes after each promotion")
    return 0


def cmd_check(args) -> int:
    config.check(args.params, _root())
    print(f"rlvr check: {args.params} is valid and every input path it names exists")
    return 0


def cmd_run(args) -> int:
    root = _root()
    # Every stage's params and inputs, before DVC deletes the outputs of the first stage it reruns.
    config.check("params.yaml", root)
    _use_services(root)
    dvc = Path(sys.executable).parent / "dvc"
    return subprocess.call([str(dvc) if dvc.exists() else "dvc", "repro", *args.dvc_args], cwd=root, env=services.dvc_env())


def cmd_retrain(args) -> int:
    root = _root()
    config.check(args.params, root)  # before dvc repro deletes any stage output
    _use_services(root)
    from flows import info_logging
    from flows.retrain import retrain
    from flows.stages import run_in_process

    info_logging()
    # without the services, the temporary Prefect server is tied to this process, as for a stage
    summary = run_in_process(retrain, params_file=args.params)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_schedule(args) -> int:
    root = _root()
    _use_services(root)
    if not os.environ.get("PREFECT_API_URL"):
        raise SystemExit("rlvr schedule needs a Prefect server: run `rlvr services up` first "
                         "(Prefect's temporary server cannot hold schedules)")
    from flows import info_logging
    from rlvr import config

    info_logging()
    params = config.load(args.params)
    if args.serve:
        from prefect.schedules import Cron

        from flows.retrain import retrain

        print(f"serving retrain as deployment 'retrain/{params.retrain.deployment}' on cron "
              f"'{params.retrain.cron}' ({params.retrain.timezone}) against {os.environ['PREFECT_API_URL']} "
              "(Ctrl-C stops)", flush=True)
        retrain.serve(name=params.retrain.deployment,
                      schedules=[Cron(params.retrain.cron, timezone=params.retrain.timezone)],
                      parameters={"params_file": args.params}, print_starting_message=False)
        return 0
    from flows import schedule

    for change in schedule.render(root, params, args.params):
        print(f"{schedule.PREFECT_FILE}: {change} (from {args.params})")
    deployed = schedule.deploy(root, params.retrain.deployment, worker=not args.no_worker)
    limit = (f"concurrency limit {deployed.concurrency_limit} ({deployed.collision_strategy})"
             if deployed.concurrency_limit else "no concurrency limit")
    print(f"deployment {deployed.name} on work pool '{deployed.pool}' ({deployed.pool_type}"
          f"{', created' if deployed.pool_created else ''}), cron {', '.join(deployed.crons) or 'none'}, {limit}, "
          f"against {os.environ['PREFECT_API_URL']}")
    worker = deployed.worker
    if worker is not None:
        print(f"worker   {worker.url}  (pid {worker.pid}, log {worker.log}): runs the pool's flow runs; "
              "`rlvr services down` stops it")
    elif args.no_worker:
        print(f"no worker started (--no-worker): start one where the runs should execute, "
              f"`prefect worker start --pool {deployed.pool}`")
    else:
        print(f"no worker started: '{deployed.pool}' is a {deployed.pool_type} pool, not a process pool; start its "
              f"worker where that infrastructure runs, `prefect worker start --pool {deployed.pool}`")
    print(f"run one now: prefect deployment run '{deployed.name}'")
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


def cmd_grid(args) -> int:
    root = _root()
    config.check("params.yaml", root)
    _use_services(root)
    from flows import grid, info_logging

    info_logging()
    names = grid.queue(root, args.name, args.set)
    print(f"queued {len(names)} experiments: {', '.join(names)}", flush=True)
    if args.no_run:
        print(f"run them with `dvc queue start -j {args.jobs}`; then `rlvr compare --grid {args.name} --baseline ...`")
        return 0
    states = grid.run_queue(root, names, args.jobs)
    failed = [n for n, s in states.items() if s != "Success"]
    print(f"grid {args.name}: {len(names) - len(failed)} succeeded, {len(failed)} did not "
          f"({', '.join(failed) or 'none'}; `dvc queue logs NAME` shows why)")
    return 1 if failed else 0


def cmd_compare(args) -> int:
    root = _root()
    _use_services(root)
    from flows import grid
    from rlvr import tracking

    params = config.load("params.yaml")
    experiment = None if args.no_mlflow else params.tracking.experiment
    uri = None if args.no_mlflow else tracking.tracking_uri(params)
    result = grid.report(root, args.grid, args.baseline, eval_set=args.eval_set,
                         out=Path(args.out) if args.out else None, mlflow_experiment=experiment,
                         tracking_uri=uri, n_boot=args.n_boot,
                         warmup_eval=Path(args.warmup_eval) if args.warmup_eval else None)
    print(result["markdown"])
    print("\n" + "  ".join(f"{kind}: {path}" for kind, path in result["files"].items())
          + (f"  MLflow run: {result['mlflow_run']}" if result["mlflow_run"] else ""))
    return 0


def cmd_recipe(args) -> int:
    root = _root()
    from flows import recipe

    if args.queue and not args.exp:
        raise SystemExit("rlvr recipe: --queue goes with --exp")
    chosen = recipe.load(args.name, root)
    params_file = root / "params.yaml"
    if args.dry_run:
        print(recipe.dry_run(chosen, params_file, root))
        return 0
    if args.apply:
        changes = recipe.apply(chosen, params_file)
        print(f"rlvr recipe {chosen.name}: {len(changes)} keys changed in params.yaml "
              f"({', '.join(k for k, _, _ in changes) or 'none'}); `git diff params.yaml` shows them")
        return 0
    recipe.resolve(chosen, params_file)  # a broken recipe fails here, before DVC copies the workspace
    config.check("params.yaml", root)
    _use_services(root)
    return recipe.run_experiment(chosen, root, queue=args.queue)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlvr", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("services", help="start, stop or show the local Prefect and MLflow servers (and vLLM)")
    p.add_argument("action", choices=("up", "down", "status"))
    p.add_argument("--prefect-port", type=int, default=4200)
    p.add_argument("--mlflow-port", type=int, default=5000)
    p.add_argument("--auth", action="store_true",
                   help=f"up: both servers require a login, from ${services.USER_ENV} and ${services.PASSWORD_ENV}")
    p.add_argument("--backend", choices=services.BACKENDS,
                   help=f"up: MLflow's store (default: postgres when ${services.BACKEND_URI_ENV} is set, else sqlite); "
                        f"postgres uses ${services.BACKEND_URI_ENV} or starts a local PostgreSQL server")
    p.add_argument("--postgres-port", type=int, default=0,
                   help="up: the local PostgreSQL server's port (default: a free one)")
    p.add_argument("--artifacts", help=f"up, postgres: where MLflow stores the artifacts it serves, a folder or a URI "
                                       f"(default ${services.ARTIFACTS_ENV}, else {services.SERVED_ARTIFACTS})")
    p.add_argument("--json", action="store_true", help="status: print the report as JSON")
    p.add_argument("--vllm", action="store_true",
                   help="up: also start the vLLM server of train.vllm_mode: server (what `trl vllm-serve` runs), "
                        "serving the model train starts from, at train.vllm_server_host:vllm_server_port")
    p.add_argument("--vllm-gpus", metavar="IDS",
                   help="up --vllm: the server's CUDA_VISIBLE_DEVICES, e.g. 6,7 (data parallel over them); give "
                        "training the other GPUs")
    p.add_argument("--vllm-tensor-parallel", type=int, default=1, metavar="N",
                   help="up --vllm: GPUs per model replica (default 1)")
    p.add_argument("--recipe", metavar="NAME",
                   help="up --vllm: take model and server params from params.yaml with this configs/recipes/ preset "
                        "applied (for `rlvr recipe NAME --exp`, which leaves params.yaml as it is)")
    p.set_defaults(func=cmd_services)
    p = sub.add_parser("doctor", help="check this machine for the pipeline; exit 1 if something it needs is missing")
    p.add_argument("--prefect-port", type=int, default=4200)
    p.add_argument("--mlflow-port", type=int, default=5000)
    p.set_defaults(func=cmd_doctor)
    p = sub.add_parser("remote", help="configure the project's default DVC remote (data and models)")
    p.add_argument("action", choices=("add",))
    p.add_argument("url", help="a folder, or s3://bucket/path, gs://..., ssh://host/path, azure://...")
    p.add_argument("--name", default="team", help="the remote's name in .dvc/config (default team)")
    p.set_defaults(func=cmd_remote)
    p = sub.add_parser("check", help="validate params and the input paths they name; runs nothing")
    p.add_argument("--params", default="params.yaml")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("run", help="check params, then run the pipeline (dvc repro); extra arguments go to dvc repro")
    p.add_argument("dvc_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("retrain", help="retrain once: dvc repro, register, promote if better")
    p.add_argument("--params", default="params.yaml")
    p.set_defaults(func=cmd_retrain)
    p = sub.add_parser("schedule", help="deploy the retrain flow from prefect.yaml (cron from params) to a work "
                                        "pool and start a worker")
    p.add_argument("--params", default="params.yaml")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--no-worker", action="store_true",
                      help="deploy only; workers started elsewhere (`prefect worker start --pool POOL`) run the flows")
    mode.add_argument("--serve", action="store_true",
                      help="no pool and no worker: serve the retrain flow from this process (blocks; Ctrl-C stops)")
    p.set_defaults(func=cmd_schedule)
    p = sub.add_parser("lineage", help="print a registered model version's lineage")
    p.add_argument("--name", help="registered model (default: retrain.registered_model)")
    p.add_argument("--version", help="version number (default: the champion)")
    p.add_argument("--params", default="params.yaml")
    p.set_defaults(func=cmd_lineage)
    p = sub.add_parser("grid", help="queue and run a grid of DVC experiments (cartesian product of -S values)")
    p.add_argument("--name", required=True, help="grid name: experiments are named <name>-<values>")
    p.add_argument("-S", "--set", action="append", default=[], metavar="KEY=V1,V2",
                   help="params.yaml key and its values (repeat for more keys), e.g. -S train.seed=0,1,2")
    p.add_argument("-j", "--jobs", type=int, default=1, help="experiments run at once (default 1)")
    p.add_argument("--no-run", action="store_true", help="only queue them (run later with dvc queue start)")
    p.set_defaults(func=cmd_grid)
    p = sub.add_parser("compare", help="compare a grid's variants over seeds: report, plot, MLflow")
    p.add_argument("--grid", required=True, help="the grid name given to rlvr grid")
    p.add_argument("--baseline", required=True, help="the reference variant, e.g. train.order=uniform")
    p.add_argument("--eval-set", default="arith", help="the held-out set of the final evaluation (default arith)")
    p.add_argument("--out", help="report folder (default reports/<grid>)")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--no-mlflow", action="store_true", help="write the report files only")
    p.add_argument("--warmup-eval", help="the warm-up's evaluation (an evaluate-stage parquet: id, correct) for "
                   "experiments run with evaluate.baseline=false")
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("recipe", help="a preset for a real model and launch layout (configs/recipes/NAME.yaml)")
    p.add_argument("name", help="the recipe: a file name in configs/recipes/ without .yaml")
    action = p.add_mutually_exclusive_group(required=True)
    action.add_argument("--dry-run", action="store_true",
                        help="print the params it changes and the exact command each stage would run")
    action.add_argument("--exp", action="store_true", help="run it as a DVC experiment named recipe-NAME")
    action.add_argument("--apply", action="store_true", help="write its overrides into params.yaml (comments kept)")
    p.add_argument("--queue", action="store_true", help="with --exp: only queue it (then `dvc queue start`)")
    p.set_defaults(func=cmd_recipe)
    return parser


def main(argv: list[str] | None = None) -> int:
    configure_environment()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except services.ServiceError as error:
        print(f"rlvr: {error}", file=sys.stderr)
        return 1
    except RlvrError as error:
        if debug_enabled():
            raise
        print(report(args.command, error), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
