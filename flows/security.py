"""Prefect server settings that refuse cross-origin writes: for the `rlvr services up` server
(flows/services.py) and for each stage's temporary server (flows/temporary_server.py).

Any web page open in a browser on this machine can send requests to 127.0.0.1, and Prefect's API has
no login by default. With these settings every POST/PUT/PATCH/DELETE needs a CSRF token, which
Prefect's client (PREFECT_CLIENT_CSRF_SUPPORT_ENABLED, on by default) and its UI fetch by themselves,
and CORS admits only the server's own origin, so a page from elsewhere can neither write without a
token nor read one. Not covered: a local process (not a browser page) can fetch a token like any client.
"""

from __future__ import annotations


def prefect_security(origin: str) -> dict[str, str]:
    """The settings for the Prefect server at `origin` (`http://127.0.0.1:PORT`), whose UI a browser
    may also open as `http://localhost:PORT`."""
    local = origin.replace("//127.0.0.1:", "//localhost:")
    return {"PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED": "true",
            "PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS": f"{origin},{local}"}
