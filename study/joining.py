"""Joining a Ray cluster the kit did not start (``ray.address``): what ``ray.init`` would not say, or says too often.

* :func:`check_ray_auth`: a cluster that wants a token (Ray's token
  authentication) and does not get the right one is one line naming
  ``RAY_AUTH_MODE=token``, at once, instead of 20 s of refusals and "could not connect".
* :func:`quiet_startup_notices`: the raylet's worker-start notices stay out of
  ``study``'s output.

The object store's endpoint and credentials reach the job's workers through
``runtime_env`` (:func:`study.storage.worker_env`, set in :func:`study.runtime.init_ray`).
"""

from __future__ import annotations

import os
import re

from trainables.errors import ConfigError

__all__ = ["STARTUP_NOTICE", "check_ray_auth", "quiet_startup_notices"]


def check_ray_auth(address: str) -> None:
    """A cluster at ``host:port`` that refuses this driver's token is one line naming ``RAY_AUTH_MODE=token``.

    Without it ``ray.init`` logs a refusal every second for about 20 s and then says
    only that it could not connect. One unauthenticated-or-not gRPC call to the GCS
    (with this machine's token when ``RAY_AUTH_MODE=token``) tells at once;
    anything but a refusal (no such address, ``auto``, ``ray://``) is left to ``ray.init``.
    """
    if not re.fullmatch(r"[\w.-]+:\d+", address):
        return
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    token_mode = os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
    metadata: tuple = ()
    if token_mode:
        from ray._raylet import AuthenticationTokenLoader

        loader = AuthenticationTokenLoader.instance()
        if loader.has_token():
            metadata = tuple(loader.get_token_for_http_header().items())
    with grpc.insecure_channel(address) as channel:
        try:
            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                gcs_service_pb2.GetClusterIdRequest(), timeout=10, metadata=metadata)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAUTHENTICATED:
                return
            if token_mode:
                raise ConfigError(
                    f"the Ray cluster at ray.address = {address} refuses this machine's token (RAY_AUTH_MODE=token); "
                    "give it the cluster's token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, as on "
                    "the head)") from None
            raise ConfigError(
                f"the Ray cluster at ray.address = {address} requires token authentication; set RAY_AUTH_MODE=token "
                "and give this machine the cluster's token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or "
                "~/.ray/auth_token, as on the head)") from None


STARTUP_NOTICE = re.compile(r"worker processes have been started on node")


def quiet_startup_notices() -> None:
    """Keep the raylet's "N PYTHON worker processes have been started ..." notices out of ``study``'s output.

    Tune and Train start several worker processes per trial; a raylet warns every
    driver when more start at once than its ``worker_maximum_startup_concurrency``
    (the node's cores by default), although nothing is wrong. On a cluster the kit
    starts, that limit is raised (:func:`init_ray`); on one it joins, the raylet
    is not the kit's to configure, so the driver drops the notice, and only it,
    from the raylet messages Ray prints (``ray._private.worker.print_to_stdstream``).
    """
    from ray._private import worker

    printer = worker.print_to_stdstream
    if getattr(printer, "unitstudy_quiet", False):
        return

    def print_to_stdstream(data, ignore_prefix):
        if data.get("pid") == "raylet":
            lines = [line for line in data.get("lines", []) if not STARTUP_NOTICE.search(line)]
            if not lines:
                return
            data = {**data, "lines": lines}
        printer(data, ignore_prefix)

    print_to_stdstream.unitstudy_quiet = True
    worker.print_to_stdstream = print_to_stdstream
