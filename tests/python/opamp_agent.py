#!/usr/bin/env python3
"""A small OpAMP agent built on the third-party PyPI client `opentelemetry-opamp-client`
(tested with 0.5b0, plain-HTTP transport, over http:// or https://, optionally with a client
certificate), used by Ampora's interoperability tests.

It drives the library's own classes, never hand-built protobuf posts:

* ``OpAMPClient`` holds the agent's identity (a uuid7 instance uid the library generates),
  its description and capabilities, and builds every message;
* ``OpAMPAgent`` runs the library's worker thread (send, retry with backoff, decode the reply,
  answer ``ReportFullState``) and its heartbeat scheduler (every ``--poll-secs``);
* an ``OpAMPCallbacks`` subclass receives the server's replies.

On a remote config it "applies" it (keeps the files in memory), records the effective config and
``RemoteConfigStatus`` APPLIED with the received hash through the client, and sends the library's
status message followed by a full state (the only library message carrying the effective config).

stdout carries one JSON object per line, flushed at once:

    {"event": "instance_uid", "uid": "<canonical uuid>"}
    {"event": "connected"}                              first successful exchange
    {"event": "connect_failed", "error": "..."}         a failed exchange (retried by the library)
    {"event": "server_error", "type": 1, "message": "..."}
    {"event": "config", "hash": "<hex>", "body": "...", "files": {...}}
    {"event": "applied", "hash": "<hex>"}
    {"event": "failed", "hash": "<hex>", "error": "..."}
    {"event": "exit", "reason": "signal" | "stdin_closed" | "max_secs"}

Diagnostics (the library's logging) go to stderr. The process ends on SIGTERM/SIGINT, when a
piped stdin is closed, and in any case after ``--max-secs``; it then lets the library send its
AgentDisconnect.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import signal
import stat
import sys
import threading
import uuid
from typing import Any

from opentelemetry._opamp.agent import OpAMPAgent
from opentelemetry._opamp.callbacks import MessageData, OpAMPCallbacks
from opentelemetry._opamp.client import OpAMPClient
from opentelemetry._opamp.proto import opamp_pb2

_print_lock = threading.Lock()


def emit(event: str, **fields: Any) -> None:
    """Print one JSON event line and flush it."""
    line = json.dumps({"event": event, **fields}, sort_keys=False)
    with _print_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


JSON_TYPES = ("application/json", "text/json")


class Callbacks(OpAMPCallbacks):
    """Reacts to the library's callbacks; everything runs on the library's worker thread."""

    def __init__(self, fail_containing: str | None = None) -> None:
        # Report FAILED for a config whose text contains this, as a Collector refuses a config
        # it cannot load.
        self.fail_containing = fail_containing
        self.connected = False
        self.failures = 0
        # The "applied" configuration: file name -> (content type, body text).
        self.files: dict[str, tuple[str, str]] = {}
        self.applied_hash: bytes | None = None

    def on_connect(self, agent: OpAMPAgent, client: OpAMPClient) -> None:
        if not self.connected:
            self.connected = True
            emit("connected")

    def on_connect_failed(self, agent: OpAMPAgent, client: OpAMPClient, error: Exception) -> None:
        self.failures += 1
        # Print the first few and then one in ten, so a dead endpoint cannot flood stdout.
        if self.failures <= 3 or self.failures % 10 == 0:
            emit("connect_failed", error=str(error), count=self.failures)

    def on_error(
        self,
        agent: OpAMPAgent,
        client: OpAMPClient,
        error_response: opamp_pb2.ServerErrorResponse,
    ) -> None:
        emit(
            "server_error",
            type=int(error_response.type),
            message=error_response.error_message,
        )

    def on_message(self, agent: OpAMPAgent, client: OpAMPClient, message: MessageData) -> None:
        remote = message.remote_config
        if remote is None:
            return
        config_hash = bytes(remote.config_hash)
        hash_hex = config_hash.hex()
        files = {
            name: (f.content_type, f.body.decode("utf-8", errors="replace"))
            for name, f in remote.config.config_map.items()
        }
        bodies = [body for _, body in files.values()]
        emit(
            "config",
            hash=hash_hex,
            body=bodies[0] if len(bodies) == 1 else "".join(bodies),
            files={name: {"content_type": ct, "body": body} for name, (ct, body) in files.items()},
        )
        error = self._validate(client, remote, files)
        if error is None and self.fail_containing and any(self.fail_containing in body for body in bodies):
            error = f"config refused: it contains {self.fail_containing!r}"
        if error is not None:
            status = client.update_remote_config_status(
                remote_config_hash=config_hash,
                status=opamp_pb2.RemoteConfigStatuses.RemoteConfigStatuses_FAILED,
                error_message=error,
            )
            if status is not None:
                agent.send(client.build_remote_config_status_response_message(status))
            emit("failed", hash=hash_hex, error=error)
            return

        # "Apply": keep the files, and make them the effective config.
        self.files = files
        self.applied_hash = config_hash
        if files:
            content_types = {ct for ct, _ in files.values()}
            # The library's effective-config helper takes one content type for all files.
            content_type = next(iter(content_types))
            if len(content_types) > 1:
                logging.warning("mixed content types %s; reporting all as %s", content_types, content_type)
            if content_type in JSON_TYPES and content_types == {content_type}:
                effective = dict(client.decode_remote_config(remote))
            else:
                effective = {name: body for name, (_, body) in files.items()}
            client.update_effective_config(effective, content_type)
        else:
            client.update_effective_config({}, "text/plain")

        status = client.update_remote_config_status(
            remote_config_hash=config_hash,
            status=opamp_pb2.RemoteConfigStatuses.RemoteConfigStatuses_APPLIED,
        )
        if status is not None:
            # The library's acknowledgement message carries the RemoteConfigStatus only; its full
            # state also carries the effective config, so send both, in this order.
            agent.send(client.build_remote_config_status_response_message(status))
            agent.send(client.build_full_state_message())
        emit("applied", hash=hash_hex)

    @staticmethod
    def _validate(client: OpAMPClient, remote: opamp_pb2.AgentRemoteConfig, files: dict) -> str | None:
        """JSON files must parse (with the library's decoder); other types are taken as they are."""
        if files and all(ct in JSON_TYPES for ct, _ in files.values()):
            try:
                for _ in client.decode_remote_config(remote):
                    pass
            except Exception as exc:  # the library raises its own decode/parse exceptions
                return str(exc)
        return None


def stdin_is_watchable() -> bool:
    """True when stdin is a pipe, socket or terminal whose closing means "stop"; /dev/null or a
    regular file would read EOF at once and must not end the agent."""
    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (OSError, ValueError, AttributeError):
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or sys.stdin.isatty()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--endpoint", required=True, help="e.g. http://127.0.0.1:4320/v1/opamp")
    parser.add_argument("--token", help="bearer token, sent as 'Authorization: Bearer TOKEN'")
    parser.add_argument("--ca-file", help="CA (PEM) to verify an https:// server with; default: the system's")
    parser.add_argument("--client-cert", help="client certificate (PEM) for mTLS")
    parser.add_argument("--client-key", help="its private key (PEM)")
    parser.add_argument("--instance-uid", help="the agent's instance uid (default: one the library generates)")
    parser.add_argument("--service-name", default="python-opamp-agent")
    parser.add_argument("--service-version", default="0.0.1")
    parser.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                        help="a non-identifying attribute (repeatable), e.g. ring=canary")
    parser.add_argument("--fail-containing", metavar="TEXT",
                        help="report FAILED for any remote config whose text contains TEXT")
    parser.add_argument("--poll-secs", type=float, default=0.2, help="heartbeat (poll) interval")
    parser.add_argument("--backoff-secs", type=float, default=0.2, help="initial retry backoff")
    parser.add_argument("--timeout-ms", type=int, default=5000, help="per-request timeout")
    parser.add_argument("--max-secs", type=float, default=60.0, help="hard bound on the run time")
    parser.add_argument("-v", "--verbose", action="store_true", help="library debug logs on stderr")
    args = parser.parse_args()

    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )

    # Last-resort bound: whatever happens below, the process is gone shortly after max-secs.
    watchdog = threading.Timer(args.max_secs + 5.0, lambda: os._exit(3))
    watchdog.daemon = True
    watchdog.start()

    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    client = OpAMPClient(
        endpoint=args.endpoint,
        headers=headers,
        timeout_millis=args.timeout_ms,
        agent_identifying_attributes={
            "service.name": args.service_name,
            "service.version": args.service_version,
        },
        agent_non_identifying_attributes={
            "os.type": sys.platform,
            "host.name": os.uname().nodename,
            "process.pid": os.getpid(),
            "telemetry.sdk.language": "python",
            **dict(label.split("=", 1) for label in args.label),
        },
        # The library's default set is exactly: ReportsStatus | AcceptsRemoteConfig |
        # ReportsEffectiveConfig | ReportsRemoteConfig | ReportsHeartbeat. Spelled out here.
        capabilities=(
            opamp_pb2.AgentCapabilities.AgentCapabilities_ReportsStatus
            | opamp_pb2.AgentCapabilities.AgentCapabilities_AcceptsRemoteConfig
            | opamp_pb2.AgentCapabilities.AgentCapabilities_ReportsEffectiveConfig
            | opamp_pb2.AgentCapabilities.AgentCapabilities_ReportsRemoteConfig
            | opamp_pb2.AgentCapabilities.AgentCapabilities_ReportsHeartbeat
        ),
        tls_certificate=args.ca_file or True,
        tls_client_certificate=args.client_cert,
        tls_client_key=args.client_key,
    )
    if args.instance_uid:
        # A client certificate names its agent's instance uid, which the library generates
        # at random and offers no parameter for: an agent that keeps its identity across
        # restarts (as a real one does) sets it here.
        client._instance_uid = uuid.UUID(args.instance_uid).bytes

    # The library generates the instance uid itself and does not expose it; read it back from a
    # message it builds (building does not send nor consume a sequence number).
    probe = opamp_pb2.AgentToServer.FromString(client.build_heartbeat_message())
    emit("instance_uid", uid=str(uuid.UUID(bytes=bytes(probe.instance_uid))))

    callbacks = Callbacks(fail_containing=args.fail_containing)
    agent = OpAMPAgent(
        interval=args.poll_secs,
        callbacks=callbacks,
        client=client,
        initial_backoff=args.backoff_secs,
        # Exponential backoff: 12 retries from 0.2 s span several minutes, beyond any test.
        max_retries=12,
    )

    stop = threading.Event()
    reason = {"value": "max_secs"}

    def request_stop(why: str) -> None:
        if not stop.is_set():
            reason["value"] = why
            stop.set()

    def on_signal(signum, frame):  # noqa: ARG001
        request_stop("signal")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    if stdin_is_watchable():

        def watch_stdin() -> None:
            try:
                for _ in iter(lambda: sys.stdin.buffer.read1(4096), b""):
                    pass
            except (OSError, ValueError):
                pass
            request_stop("stdin_closed")

        threading.Thread(target=watch_stdin, name="stdin-watch", daemon=True).start()

    agent.start()
    stop.wait(args.max_secs)

    # The library's stop() sends AgentDisconnect (best effort, bounded by --timeout-ms) and joins
    # its threads. It is also registered with atexit; run it once, here.
    atexit.unregister(agent.stop)
    agent.stop(timeout=2.0)
    emit("exit", reason=reason["value"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
