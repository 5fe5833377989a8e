"""Where studies live: Optuna's RDB storages (sqlite, PostgreSQL...) or a journal file, and
how a dead worker's running trial is recognised (same host: its process is gone; another
host: its heartbeat stopped).

Example::

    storage = open_storage("sqlite:///runs/x/study.db")      # or "runs/x/study.journal"
    fail_dead_trials(optuna.load_study(study_name=name, storage=storage))
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from ..errors import UserError

def storage_url(settings) -> str:
    """The storage URL: ``--storage`` (checked by :func:`check_storage`) or ``sqlite:///RUN/study.db``."""
    if settings.storage:
        check_storage(settings.storage, settings.run_dir)
    return settings.storage or f"sqlite:///{Path(settings.run_dir).resolve() / 'study.db'}"


def check_storage(url: str, run_dir: str | os.PathLike = "RUN") -> None:
    """Refuse a storage the search cannot keep: an in-memory SQLite database (``sqlite://``,
    ``sqlite:///:memory:``) is gone when the process ends and is not shared with the workers or
    the report, so nothing could be resumed."""
    if url.startswith("sqlite:") and (url.rstrip("/") in ("sqlite:", "sqlite:/")
                                      or url.split("?")[0].endswith(":memory:") or "mode=memory" in url):
        raise UserError(f"storage {url!r} is in memory: a study there cannot persist or be resumed; name a "
                        f"file, like sqlite:///{Path(run_dir) / 'study.db'}")


def is_run_storage(url: str, run_dir: str | os.PathLike) -> bool:
    """Whether ``url`` (a sqlite URL or a journal file) names a file inside ``run_dir``: the storages a
    report may open on its own. A server (postgresql://...) or a file elsewhere needs the user's word."""
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):].split("?")[0]
    elif "://" in url:
        return False
    else:
        path = url
    if not path or path == ":memory:":
        return False
    run = Path(run_dir).resolve()
    target = Path(path)
    if not target.exists() and not target.is_absolute():  # looked for in the run folder, as the report does
        target = run / target.name
    return target.resolve().is_relative_to(run)


def open_storage(url: str):
    """An Optuna storage: a journal file for paths ending ``.journal``/``.log``, an RDB URL otherwise."""
    import optuna  # noqa: PLC0415

    if "://" not in url:
        if not url.endswith((".journal", ".log")):
            raise UserError(f"storage {url!r}: give an RDB URL (sqlite:///path.db, postgresql://...) "
                            f"or a journal file ending in .journal")
        from optuna.storages.journal import JournalFileBackend  # noqa: PLC0415

        Path(url).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(url))
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    try:
        storage = optuna.storages.RDBStorage(url, engine_kwargs=engine)
        if url.startswith("sqlite"):
            _fast_sqlite(storage.engine)
        return storage
    except (ImportError, ModuleNotFoundError) as exc:
        raise UserError(f"storage {url!r} needs a database driver that is not installed ({exc})") from None
    except Exception as exc:  # SQLAlchemy's errors for bad URLs and unreachable servers
        raise UserError(f"cannot open storage {url!r}: {str(exc).splitlines()[0]}; check the URL, or move a "
                        f"damaged database aside and give another --storage") from None


def _fast_sqlite(engine) -> None:
    """WAL journal, fsync at checkpoints only: a commit still survives a killed process (SIGKILL),
    only an operating-system crash could lose the last trials; readers no longer block the writer."""
    from sqlalchemy import event  # noqa: PLC0415

    def pragmas(connection, _record):
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    event.listen(engine, "connect", pragmas)
    engine.dispose()


def default_study_name(space: str, budget, pareto: bool) -> str:
    """``space:budget-specs[:pareto]``, so different budgets in one run directory do not collide."""
    return f"{space}:{','.join(budget.specs)}{':pareto' if pareto else ''}"


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


HEARTBEAT_SECONDS = 15.0


def fail_dead_trials(study) -> int:
    """Mark RUNNING trials whose worker is gone as FAIL: at once for a dead process on this host
    (a SIGKILLed run), after four missed heartbeats for a worker on another machine."""
    from optuna.trial import TrialState  # noqa: PLC0415

    host = socket.gethostname()
    failed = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker", "")
        name, _, pid = worker.rpartition(":")
        if name != host or not pid.isdigit():
            beat = trial.user_attrs.get("heartbeat", trial.datetime_start.timestamp() if trial.datetime_start else None)
            if beat is not None and time.time() - beat > 4 * HEARTBEAT_SECONDS:
                failed += bool(study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL))
            continue
        try:
            os.kill(int(pid), 0)
            continue
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        if study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
            failed += 1
    return failed


class Heartbeat:
    """Writes the time into a running trial's ``heartbeat`` attribute every few seconds."""

    def __init__(self, trial):
        import threading  # noqa: PLC0415

        self.trial, self.stop = trial, threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self.stop.wait(HEARTBEAT_SECONDS):
            try:
                self.trial.set_user_attr("heartbeat", time.time())
            except Exception:  # noqa: BLE001 (the trial finished in between; nothing to keep alive)
                return

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
