"""``leasesched token create|list|revoke``: bearer tokens, managed straight in
Cassandra by an operator. A token's secret is printed once, at creation."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from typing import Any, Awaitable, Callable

import click

from leasesched.auth import ROLES, new_token
from leasesched.config import Config
from leasesched.store.cassandra import CassandraStore


def _with_store(cfg: Config, fn: Callable[[CassandraStore], Awaitable[Any]]) -> Any:
    async def run() -> Any:
        store = CassandraStore(cfg)
        await store.connect()
        try:
            return await fn(store)
        finally:
            await store.close()

    return asyncio.run(run())


@click.group()
def token() -> None:
    """Bearer tokens: one namespace and one role each."""


@token.command()
@click.option("--namespace", "-n", required=True)
@click.option("--role", type=click.Choice(ROLES), required=True)
@click.option("--name", default="", help="A note: who or what uses it.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def create(cfg: Config, namespace: str, role: str, name: str, as_json: bool) -> None:
    """Create a token and print it (the only time it is shown)."""
    plaintext, record = new_token(namespace, role, name)
    _with_store(cfg, lambda store: store.put_token(record))
    if as_json:
        click.echo(json.dumps({"token": plaintext, "token_id": record.token_id, "namespace": namespace, "role": role}))
    else:
        click.echo(plaintext)
        click.echo(f"(token id {record.token_id}, {role} of namespace {namespace!r}; store it now, it is not shown again)", err=True)


@token.command("list")
@click.pass_obj
def list_tokens(cfg: Config) -> None:
    """Token ids, namespaces, roles; never secrets."""
    records = _with_store(cfg, lambda store: store.list_tokens())
    click.echo(f"{'TOKEN ID':16}  {'ROLE':6}  {'NAMESPACE':20}  {'CREATED':20}  STATE    NAME")
    for r in sorted(records, key=lambda r: r.created_at):
        created = dt.datetime.fromtimestamp(r.created_at / 1000, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        state = "revoked" if r.revoked else "active"
        click.echo(f"{r.token_id:16}  {r.role:8}  {r.namespace:20}  {created:20}  {state:7}  {r.name}")


@token.command()
@click.argument("token_id")
@click.pass_obj
def revoke(cfg: Config, token_id: str) -> None:
    """Revoke a token (servers stop accepting it within auth_cache_s)."""
    if not _with_store(cfg, lambda store: store.revoke_token(token_id)):
        raise click.ClickException(f"no token with id {token_id}")
    click.echo(f"revoked {token_id}")


def register(cli: click.Group) -> None:
    cli.add_command(token)
