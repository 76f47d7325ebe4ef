"""``ser keys create|list|revoke``: API key administration against the configured database."""

from __future__ import annotations

import argparse
import json
from datetime import datetime
from typing import TYPE_CHECKING

from ser_shared.clock import as_utc
from ser_shared.errors import SERError

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from ser_shared.settings import Settings

# SQLAlchemy, pydantic settings and the models are imported inside the commands: `ser --help` and
# the client commands (submit, status, history) build this parser too, and should start without them.


def get_settings() -> Settings:
    from ser_shared.settings import get_settings as settings

    return settings()


def _sessions() -> sessionmaker[Session]:
    from ser_shared.db import make_engine, make_session_factory

    return make_session_factory(make_engine(get_settings()))


def iso(value: datetime | None) -> str | None:
    # "+00:00", not the API's "Z": the output `ser keys list` has always printed.
    return None if value is None else as_utc(value).isoformat(timespec="seconds")


def _create(args: argparse.Namespace) -> int:
    from ser_shared import apikeys

    with _sessions()() as session:
        try:
            new = apikeys.create(session, args.name, args.tenant)
        except SERError as exc:
            print(f"error: {exc.message}")
            return 2
        session.commit()
    if args.json:
        print(json.dumps({"id": str(new.id), "name": new.name, "tenant": new.tenant, "key": new.key}))
    else:
        print(f"API key for {new.name!r} (tenant {new.tenant}, id {new.id}):\n\n    {new.key}\n\n"
              "It is shown only now; store it safely. Send it as 'Authorization: Bearer <key>'.")
    if not get_settings().auth_enabled:
        print("note: authentication is off here (SER_AUTH); keys are only checked when it is on.")
    return 0


def _list(args: argparse.Namespace) -> int:
    from ser_shared import apikeys

    with _sessions()() as session:
        rows = [{"id": str(r.id), "name": r.name, "tenant": r.tenant, "prefix": r.prefix,
                 "created_at": iso(r.created_at), "last_used_at": iso(r.last_used_at),
                 "revoked_at": iso(r.revoked_at)} for r in apikeys.listing(session)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        state = f"revoked {r['revoked_at']}" if r["revoked_at"] else f"last used {r['last_used_at'] or 'never'}"
        print(f"{r['id']}  {r['prefix']}…  {r['name']:<20} tenant={r['tenant']:<20} {state}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from ser_shared import apikeys

    with _sessions()() as session:
        try:
            row = apikeys.revoke(session, args.key_id)
        except SERError as exc:
            print(f"error: {exc.message}")
            return 2
        session.commit()
        print(f"revoked {row.id} ({row.name}); its sessions end on their next request")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    keys = sub.add_parser("keys", help="create, list and revoke API keys")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    p = ksub.add_parser("create", help="create a key (printed once)")
    p.add_argument("--name", required=True, help="who or what uses it, e.g. 'call-centre-batch'")
    p.add_argument("--tenant", default=None,
                   help="add the key to this existing tenant (default: a new tenant of its own)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_create)
    p = ksub.add_parser("list", help="list keys (never the keys themselves)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_list)
    p = ksub.add_parser("revoke", help="revoke a key by id or shown prefix")
    p.add_argument("key_id")
    p.set_defaults(func=_revoke)
