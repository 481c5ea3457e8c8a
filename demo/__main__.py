"""``make run`` = ``python -m demo``: print where to go, serve until Ctrl-C."""

from __future__ import annotations

import asyncio
import signal
import sys

from bff.config import ConfigError
from bff.log import setup_logging
from demo.run import DEMO_USER, DemoOptions, run_demo

BANNER = """
  bff demo is running.

    Open        {app}
    Log in as   {user}   (the mock OP asks only for a user name: no password;
                          any other name works too)

    OpenID Provider  {op}  (oidc-provider-mock; access tokens live {ttl} s, so
                     a call after that shows bff refreshing the token silently)
    Demo API         {api}  (reached only through bff at /api/demo)
    Session store    {store}

  Press Ctrl-C to stop.
"""


async def serve(options: DemoOptions) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with run_demo(options) as urls:
        store = (
            "memory (set REDIS_URL=redis://... for Redis)"
            if urls.store == "memory://"
            else urls.store
        )
        print(
            BANNER.format(
                app=urls.app,
                user=DEMO_USER,
                op=urls.op,
                ttl=options.access_ttl,
                api=urls.api,
                store=store,
            ),
            flush=True,
        )
        await stop.wait()
        print("\n  Stopping…", flush=True)
    print("  Stopped.", flush=True)


def main() -> int:
    setup_logging("info", "text")
    try:
        options = DemoOptions.from_env()
        asyncio.run(serve(options))
    except (ValueError, ConfigError) as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(
            f"demo: cannot start: {exc}.\n"
            "  A port may be in use: set DEMO_PORT, DEMO_OP_PORT or DEMO_API_PORT to free ones.",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
