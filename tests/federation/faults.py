"""Fault injection for the federation tests, kept out of fedct's apps.

- :func:`fail_in_round`: a ClientApp mod (Flower's wrapper of every handler) that makes
  one site's training raise in one round, as a site that crashes mid-round;
- :func:`failing_client_app` / :func:`dying_server_app`: the apps a simulation runs for
  that (``fedct.federation.simulation.Apps`` names them), the server's process killed
  with SIGKILL once a round is checkpointed, as under ``kill -9``.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.serverapp import ServerApp

from fedct.federation.client_app import make_client_app, node_config, node_site
from fedct.federation.server_app import make_server_app


def fail_in_round(site: str, server_round: int,
                  overrides: Mapping[str, Any] | None = None) -> Mod:
    """A mod under which ``site``'s ClientApp raises in round ``server_round``'s training."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type == "train":
            rnd = int(msg.content["config"]["server-round"])
            if rnd == server_round and node_site(context, node_config(context, overrides))[0] \
                    == site:
                raise RuntimeError(f"fault injection: site {site} fails in round {rnd}")
        return call_next(msg, context)

    return mod


def failing_client_app(run_config: Mapping[str, Any], site: str, server_round: int
                       ) -> ClientApp:
    """fedct's ClientApp, except that ``site`` fails in round ``server_round``."""
    return make_client_app(run_config, mods=[fail_in_round(site, server_round, run_config)])


def dying_server_app(run_config: Mapping[str, Any], after_round: int) -> ServerApp:
    """fedct's ServerApp, whose process dies (SIGKILL) once ``after_round`` is checkpointed."""

    def die(record: dict) -> None:
        if record["round"] == after_round:
            os.kill(os.getpid(), signal.SIGKILL)

    return make_server_app(run_config, on_round=die)
