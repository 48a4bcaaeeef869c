"""Step 3's access tokens, checked by the Starlette references of bench.py (not a step).

The same check as tokens.py's, without Flask: a Bearer token signed with JWT_SECRET_KEY (from
the environment), of type at+jwt, with `sub`, `iat` and `exp`.
"""

import os

import jwt
from starlette.requests import Request


def user_of(request: Request) -> str | None:
    """The user a request's Bearer token names, or None if it has no good one."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    try:
        decoded = jwt.decode_complete(
            token.strip(),
            os.environ["JWT_SECRET_KEY"],
            algorithms=["HS256"],
            options={"require": ["exp", "iat", "sub"]},
        )
    except jwt.PyJWTError:
        return None
    return decoded["payload"]["sub"] if decoded["header"].get("typ") == "at+jwt" else None
