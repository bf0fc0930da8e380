"""``run.loggers``: every metrics and evaluation record also goes to TensorBoard, MLflow and Weights & Biases.

Rank 0 only, keyed by step with ``tokens`` among the values; the resolved config
goes in as the run's parameters. Offline first: TensorBoard event files in the
run directory; MLflow to ``MLFLOW_TRACKING_URI`` or a SQLite database beside the run
directories (``run.dir/mlflow.db``, MLflow's supported local store); W&B offline
unless the user has logged in. A tracker that fails (a server that cannot be
reached) is reported once and dropped; the run goes on.

A resumed run continues the same tracker runs (their ids are kept in
``trackers.json``) and skips the records it already sent: a resume is exact, so
the records a crashed attempt logged after its checkpoint are the ones the
resumed run would log again. What was sent is each tracker's own word where it
can give it: an attempt killed between sending a record and noting it in
``trackers.json`` must not send it twice (TensorBoard purges past its last noted
step, MLflow is asked for the last step it holds).
"""
from __future__ import annotations

import importlib
import json
import os
import secrets
import time
from pathlib import Path
from typing import Callable

from raytrain.config import flatten

MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # what each one needs imported
EXTRA = "pip install 'raytrain[tracking]'"


def missing_trackers(loggers: list[str]) -> list[str]:
    """The asked-for trackers whose library is not installed."""
    missing = []
    for name in loggers:
        try:
            importlib.import_module(MODULES[name])
        except ImportError:
            missing.append(name)
    return missing


def numeric(record: dict, kind: str) -> dict[str, float]:
    """The record's numbers by name, but its step (the key of every point). An evaluation's ``tokens`` is left
    to the metrics record of the same step, so no tracker gets two points of one name at one step."""
    skip = {"step", "tokens"} if kind == "eval" else {"step"}
    return {k: float(v) for k, v in record.items()
            if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoard:
    """``sent``: the steps noted as sent, by kind. A resumed writer tells TensorBoard's readers to drop what an
    earlier attempt wrote from the first unnoted step on (its ``purge_step``); everything after is sent again."""

    def __init__(self, run_dir: Path, cfg, state: dict, sent: dict):
        from torch.utils.tensorboard import SummaryWriter
        last = min(sent.values(), default=None)
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=None if last is None else last + 1)
        sent.update(dict.fromkeys(sent, last))
        if not state:
            self.writer.add_text("config", "```yaml\n" + cfg.to_yaml() + "```", 0)
        state["dir"] = str(run_dir / "tensorboard")

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def mlflow_uri(runs_dir: Path) -> str:
    """``MLFLOW_TRACKING_URI`` when set, else a SQLite database beside the runs, so runs and a search's trials
    sit side by side (MLflow 3 deprecates its file store and refuses it without a consent variable)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(runs_dir).resolve() / 'mlflow.db'}"


def create_mlflow_store(runs_dir: Path) -> None:
    """Create the default store's tables once, in the driver: trials opening a new database at once would each
    run MLflow's schema migrations on it. A store the user named is left to them."""
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        from mlflow import MlflowClient
        Path(runs_dir).mkdir(parents=True, exist_ok=True)
        MlflowClient(tracking_uri=mlflow_uri(runs_dir)).search_experiments(max_results=1)


class MLflow:
    """One MLflow run per raytrain run, in the experiment named by run.group (a search) or 'raytrain'. A record
    goes in one transaction, so the store's last step per kind is what was sent."""

    def __init__(self, run_dir: Path, cfg, state: dict, sent: dict):
        from mlflow import MlflowClient
        from mlflow.entities import Param
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # an unreachable server fails fast, once
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        uri = mlflow_uri(run_dir.parent)
        self.client = MlflowClient(tracking_uri=uri)
        if "run_id" not in state:
            run = self.client.create_run(self.experiment(cfg.run.group or "raytrain"), run_name=cfg.run.name)
            params = [Param(k, json.dumps(v)[:6000]) for k, v in flatten(cfg.model_dump(mode="json")).items()]
            for i in range(0, len(params), 100):
                self.client.log_batch(run.info.run_id, params=params[i:i + 100])
            state.update(run_id=run.info.run_id, tracking_uri=uri)
        self.run_id = state["run_id"]
        sent.clear()
        sent.update(self.last_steps())

    def last_steps(self) -> dict[str, int]:
        """{kind: the last step the store holds}: an evaluation's names start with 'val/', a metrics record
        always has 'tokens'."""
        names = sorted(self.client.get_run(self.run_id).data.metrics)
        found = {"metrics": "tokens" if "tokens" in names else None,
                 "eval": next((n for n in names if n.startswith("val/")), None)}
        return {kind: max(m.step for m in self.client.get_metric_history(self.run_id, name))
                for kind, name in found.items() if name}

    def experiment(self, name: str) -> str:
        """Its id, creating it; two trials of a search may both try to create it at once."""
        for _ in range(3):
            found = self.client.get_experiment_by_name(name)
            if found:
                return found.experiment_id
            try:
                return self.client.create_experiment(name)
            except Exception:  # noqa: BLE001 - created by the other trial in between: look it up again
                time.sleep(0.5)
        raise RuntimeError(f"could not create or find MLflow experiment {name!r}")

    @staticmethod
    def key(name: str) -> str:
        """val/loss@256/pos0-0 -> val/loss_at_256.pos0-0: MLflow refuses '@' in names; the buckets keep the
        names they had in the file store, so a migrated store and a new one read alike."""
        return name.replace("@", "_at_").replace("/pos", ".pos")

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(self.key(k), v, now, step) for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandB:
    """One W&B run per raytrain run (project 'raytrain', grouped by run.group); offline unless logged in."""

    def __init__(self, run_dir: Path, cfg, state: dict, sent: dict):
        import wandb
        state.setdefault("id", secrets.token_hex(4))  # W&B's own form: 8 lowercase characters
        mode = os.environ.get("WANDB_MODE") or ("online" if logged_in() else "offline")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "raytrain"), name=cfg.run.name,
                              group=cfg.run.group, id=state["id"], resume="allow", dir=str(run_dir), mode=mode,
                              config=cfg.model_dump(mode="json"), settings=wandb.Settings(silent=True))
        state.update(mode=mode, open=True)
        self.state = state

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()
        self.state["open"] = False


def logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path("~/.netrc").expanduser()
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text()


TRACKERS = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB}


class Trackers:
    """The run's trackers, opened on rank 0; ``log`` sends one metrics or evaluation record to each."""

    @staticmethod
    def open(run_dir: Path, cfg, say: Callable[[str], None]) -> "Trackers | None":
        """The run's trackers, or None when run.loggers names none."""
        return Trackers(run_dir, cfg, say) if cfg.run.loggers else None

    def __init__(self, run_dir: Path, cfg, say: Callable[[str], None]):
        self.path, self.say = run_dir / "trackers.json", say
        self.state = json.loads(self.path.read_text()) if self.path.is_file() else {}
        # W&B writes through its own service process, which buffers: an attempt killed before W&B's finish()
        # loses what it had not written yet. Its records are then sent again (replay); the W&B server drops
        # steps it already has when offline files are synced.
        if self.state.get("wandb", {}).get("open"):
            self.state.setdefault("sent", {}).pop("wandb", None)
        self.state.setdefault("sent", {})
        self.open = {}
        for name in cfg.run.loggers:
            self._guard(name, lambda name=name: self.open.__setitem__(name, TRACKERS[name](
                run_dir, cfg, self.state.setdefault(name, {}), self.state["sent"].setdefault(name, {}))))
        self._save()

    def log(self, kind: str, record: dict) -> None:
        """``kind``: 'metrics' or 'eval'. A tracker skips records at or before the last step it was sent."""
        values, step = numeric(record, kind), record["step"]
        for name in list(self.open):
            sent = self.state["sent"].setdefault(name, {})
            if step > sent.get(kind, -1):
                self._guard(name, lambda name=name: self.open[name].log(values, step))
                sent[kind] = step
        self._save()

    def replay(self, run_dir: Path) -> None:
        """Send the records the run directory holds (after a restart truncated them to its checkpoint), in step
        order, metrics before evaluation at one step as the loop writes them; each tracker skips what it has."""
        records = []
        for order, kind in enumerate(("metrics", "eval")):
            path = run_dir / f"{kind}.jsonl"
            lines = path.read_text().splitlines() if path.is_file() else []
            records += [(json.loads(line)["step"], order, kind, json.loads(line)) for line in lines if line]
        for _, _, kind, record in sorted(records, key=lambda r: r[:2]):
            self.log(kind, record)

    def close(self) -> None:
        for name in list(self.open):
            self._guard(name, self.open[name].close)
        self._save()

    def _guard(self, name: str, call: Callable[[], None]) -> None:
        try:
            call()
        except Exception as err:  # noqa: BLE001 - any tracker failure: report once, keep training
            self.open.pop(name, None)
            reason = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
            self.state.setdefault("dropped", {})[name] = reason
            self.say(f"warning: run.loggers: {name} failed ({reason}); the run goes on without it")

    def _save(self) -> None:
        """Whole or not at all: a kill mid-write must not leave a file the next attempt cannot read."""
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps(self.state, indent=1))
        os.replace(partial, self.path)
