"""Migrate Argilla's database, create or realign the stack's users, and (when asked) rebuild the search index.

Runs inside the argilla-server venv (``python -m loop_argilla_bootstrap``, started by
``annotation.stack_setup._bootstrap``): migrations, users and reindex in ONE interpreter, because
each ``python -m argilla_server ...`` call spends ~4 s of CPU importing the server. Parameters
arrive as JSON on stdin (``{"workspace", "reindex", "users": [{"username", "password",
"api_key", "role"}]}``) so secrets never show on a command line. The credentials file is the
source of truth: a user whose key, role or password differs from it is realigned.
"""

import asyncio
import importlib.util
import json
import sys
import types


def _bare_server_package() -> None:
    # argilla_server/__init__.py builds the whole web app (and copies 14 MB of UI files) on import; the
    # bootstrap needs none of it. A bare package object lets the submodules import without running
    # __init__ (~2 s less CPU).
    spec = importlib.util.find_spec("argilla_server")
    if spec is None or spec.submodule_search_locations is None:
        raise SystemExit("argilla_server is not installed in this interpreter")
    pkg = types.ModuleType("argilla_server")
    pkg.__path__, pkg.__file__, pkg.__spec__ = list(spec.submodule_search_locations), spec.origin, spec
    sys.modules["argilla_server"] = pkg


async def ensure_users(p: dict) -> None:
    from argilla_server.contexts import accounts
    from argilla_server.database import AsyncSessionLocal
    from argilla_server.models import User, UserRole, Workspace, WorkspaceUser

    async with AsyncSessionLocal() as db:
        ws = (await Workspace.get_by(db, name=p["workspace"])
              or await accounts.create_workspace(db, {"name": p["workspace"]}))
        for u in p["users"]:
            user = await accounts.get_user_by_username(db, u["username"])
            if user is None:
                user = await User.create(db, first_name=u["username"], username=u["username"],
                                         role=UserRole(u["role"]), password_hash=accounts.hash_password(u["password"]),
                                         api_key=u["api_key"])
                print("created user", u["username"], u["role"])
            else:  # the credentials file is the source of truth: realign a user whose file was regenerated
                changes = {}
                if user.api_key != u["api_key"]:
                    changes["api_key"] = u["api_key"]
                if user.role != UserRole(u["role"]):
                    changes["role"] = UserRole(u["role"])
                if not accounts.verify_password(u["password"], user.password_hash):
                    changes["password_hash"] = accounts.hash_password(u["password"])
                if changes:
                    await user.update(db, **changes)
                    print("updated user", u["username"], sorted(changes))
            if await WorkspaceUser.get_by(db, workspace_id=ws.id, user_id=user.id) is None:
                await WorkspaceUser.create(db, workspace_id=ws.id, user_id=user.id)


def main() -> int:
    p = json.load(sys.stdin)
    _bare_server_package()
    from argilla_server.cli.database.migrate import migrate_db

    migrate_db(revision="head")
    asyncio.run(ensure_users(p))
    if p["reindex"]:
        from argilla_server.cli.search_engine.reindex import _reindex

        asyncio.run(_reindex())
        print("search index rebuilt from the database")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
