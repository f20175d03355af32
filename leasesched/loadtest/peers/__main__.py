"""``python -m leasesched.loadtest.peers``: run the Celery + Redis peer, and put it beside a leasesched run.

    .venv/bin/python -m leasesched.loadtest.peers --leasesched-report results/<run>/report.json
    .venv/bin/python -m leasesched.loadtest.peers --tasks 2000 --rate 100 --rate-seconds 10   # a short look
    .venv/bin/python -m leasesched.loadtest.peers --table results/<peer run>/peer.json results/<run>/report.json

``make bench-peers`` runs ``leasesched loadtest`` first, then this with its
report. The peer's phase at the leasesched run's ``--schedule-rate`` is the
one set beside it (added to ``--rate`` if missing). Writes
``results/<run>/peer.json`` (and ``comparison.md`` with a report), prints the
peer's figures and the combined table. Needs ``pip install -e '.[peers]'``
and ``/usr/bin/redis-server``.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from leasesched.loadtest.peers.results import (
    PeerResult,
    comparison,
    from_dict,
    leasesched_rate,
    machine_line,
    peer_lines,
    render,
    to_dict,
)


@click.command()
@click.option("--leasesched-report", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A leasesched loadtest report.json to set beside the peer.")
@click.option("--tasks", type=int, default=20_000, show_default=True, help="(a) Tasks enqueued at once and drained (0: none).")
@click.option("--rate", "rates", type=float, multiple=True, help="(c) Open-loop rates per second [default: 100 and 500].")
@click.option("--rate-seconds", type=float, default=30.0, show_default=True, help="(c) Seconds of each open-loop phase.")
@click.option("--drain-timeout", type=float, default=90.0, show_default=True, help="Longest wait for a phase's last task.")
@click.option("--concurrency", type=int, default=2, show_default=True, help="Prefork pool processes of the worker.")
@click.option("--overlap-tasks", type=int, default=2, show_default=True, help="(d) Tasks of the overlap check (0: none).")
@click.option("--overlap-handler", type=float, default=5.0, show_default=True, help="(d) Their handler's seconds.")
@click.option("--visibility", type=float, default=2.0, show_default=True, help="(d) The Redis transport's visibility timeout, s.")
@click.option("--results", "results_dir", default="results", show_default=True)
@click.option("--label", default="peer-celery", show_default=True)
@click.option("--redis-server", default="/usr/bin/redis-server", show_default=True)
@click.option("--table", "table", is_flag=True, help="Only print the table of a peer.json and a report.json given as arguments.")
@click.argument("files", nargs=-1, type=click.Path(exists=True, dir_okay=False))
def main(leasesched_report: str | None, tasks: int, rates: tuple[float, ...], rate_seconds: float, drain_timeout: float,
         concurrency: int, overlap_tasks: int, overlap_handler: float, visibility: float, results_dir: str, label: str,
         redis_server: str, table: bool, files: tuple[str, ...]) -> None:  # fmt: skip
    """The Celery + Redis peer of issue 17 (BENCHMARKS.md)."""
    if table:
        if len(files) != 2:
            raise click.UsageError("--table takes a peer.json and a report.json")
        peer = from_dict(json.loads(Path(files[0]).read_text()))
        report = json.loads(Path(files[1]).read_text())
        click.echo(render(comparison(report, peer)) + "\n\n" + machine_line(report, peer))
        return
    from leasesched.loadtest.peers.celery_peer import CeleryPeer, PeerOptions

    report = json.loads(Path(leasesched_report).read_text()) if leasesched_report else None
    wanted = list(rates) or [100.0, 500.0]
    if report is not None and leasesched_rate(report) not in wanted:
        wanted.insert(0, leasesched_rate(report))
    opts = PeerOptions(tasks=tasks, drain_timeout_s=drain_timeout, rates=wanted, rate_seconds=rate_seconds,
                       concurrency=concurrency, overlap_tasks=overlap_tasks, overlap_handler_s=overlap_handler,
                       visibility_s=visibility, results_dir=results_dir, label=label, redis_server=redis_server)  # fmt: skip
    result: PeerResult = CeleryPeer(opts).run()
    folder = Path(result.folder)
    (folder / "peer.json").write_text(json.dumps(to_dict(result), indent=2))
    click.echo("\n".join(peer_lines(result)))
    if report is not None:
        text = render(comparison(report, result)) + "\n\n" + machine_line(report, result)
        run = report.get("run", {})
        head = (f"leasesched run {run.get('label') or run.get('id')} ({run.get('started_at')}, "
                f"{report.get('files', {}).get('folder')}) beside {result.system} ({result.started_at}, {result.folder})")  # fmt: skip
        (folder / "comparison.md").write_text(head + "\n\n" + text + "\n")
        click.echo("\n" + head + "\n\n" + text)
    click.echo(f"\npeer results: {folder / 'peer.json'}")


if __name__ == "__main__":
    main()
